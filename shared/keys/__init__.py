"""Where CA keys live. One interface; local key files (embedded default) and Azure Key Vault.

A CA key is created inside its store and never leaves it: the service only ever holds an object that
signs (`ec.EllipticCurvePrivateKey`), whatever the store.
"""

from abc import ABC, abstractmethod
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec


class KeyStore(ABC):
    backend: str = "abstract"
    remote: bool = False  # True when signing is a network call (keep it off the event loop)

    @abstractmethod
    def create_ca_key(self, name: str, curve: str, common_name: str) -> ec.EllipticCurvePrivateKey:
        """Create a new CA key called `name` on `curve` ("P-256" or "P-384") and return a signer for it.

        `common_name` is what the CA certificate will be called, for stores that keep one.
        """

    @abstractmethod
    def install_ca_certificate(self, name: str, certificate: x509.Certificate, chain: list[x509.Certificate]) -> None:
        """Store the signed CA certificate (and its issuers) beside the key `name`."""

    @abstractmethod
    def delete_ca_key(self, name: str) -> str | None:
        """Remove the key `name` (and any certificate beside it) after a CA creation that failed.

        Returns None when nothing is left, else one sentence saying what was left and how to remove it."""

    @abstractmethod
    def signing_key(self, name: str) -> ec.EllipticCurvePrivateKey:
        """A signer for the existing key `name`."""

    @abstractmethod
    def describe(self) -> dict[str, str]:
        """What this store is, for health output. Never secrets."""

    @abstractmethod
    def backup_into(self, home: Path) -> str:
        """Copy the CA keys this store holds into the PKI home `home`, laid out as this store reads them
        (for `backup`). Returns one sentence for the operator: what was copied, or why nothing was."""

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
