"""Errors raised by the pure PKI layer. Each carries a stable code for the API and CLI."""


class PkiError(ValueError):
    """Something the caller asked of the PKI layer that the certificate rules do not allow."""

    code = "pki-error"

    def __init__(self, code: str, message: str) -> None:
        """TypeError when `code` or `message` is not text: the API and CLI answer with both."""
        if not isinstance(code, str) or not isinstance(message, str):
            raise TypeError(f"{type(self).__name__} needs a code and a message that are text")
        super().__init__(message)
        self.code = code
        self.message = message


class CsrRejected(PkiError):
    """A CSR, or the device ID sent with it, that this CA will not sign."""


class ValidityError(PkiError):
    """No validity period fits inside the issuer's (the issuer has expired, say)."""
