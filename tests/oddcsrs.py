"""CSRs as odd tools and devices write them, validly self-signed: built by editing a good CSR with pyasn1
and signing the edited CertificationRequestInfo again with the device key."""

from collections.abc import Callable

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from pyasn1.codec.der import decoder, encoder
from pyasn1.type import univ
from pyasn1_modules import rfc2986

from .csrs import device_key, make_csr

UTF8_STRING = 0x0C


def resigned(common_name: str, edit: Callable[[rfc2986.CertificationRequestInfo], None], key=None) -> bytes:
    """A DER CSR for `common_name` whose CertificationRequestInfo `edit` changed, signed again by its key."""
    key = key or device_key()
    der = make_csr(common_name, key=key, encoding=serialization.Encoding.DER)
    request, _ = decoder.decode(der, asn1Spec=rfc2986.CertificationRequest())
    info = request["certificationRequestInfo"]
    edit(info)
    signature = key.sign(encoder.encode(info), ec.ECDSA(hashes.SHA256()))
    request["signature"] = univ.BitString.fromOctetString(signature)
    return encoder.encode(request)


def csr_with_version(common_name: str, version: int) -> bytes:
    """PKCS#10 knows only version 0 (RFC 2986 §4.1); some libraries write 1."""

    def edit(info):
        info["version"] = version

    return resigned(common_name, edit)


def csr_with_raw_cn(common_name: str, raw_value: bytes, tag: int = UTF8_STRING) -> bytes:
    """A CSR whose CN is `raw_value` under `tag` as it is, valid for that string type or not.
    `common_name` only seeds the CSR before its CN is replaced."""

    def edit(info):
        rdn = info["subject"][0][0]  # the one RDN, its one attribute: the CN
        rdn[0]["value"] = univ.Any(bytes([tag, len(raw_value)]) + raw_value)

    return resigned(common_name, edit)
