"""The curves this CA accepts and the signature hash that goes with each."""

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from .errors import PkiError

CA_CURVES: dict[str, ec.EllipticCurve] = {"P-256": ec.SECP256R1(), "P-384": ec.SECP384R1()}
DEVICE_CURVES = CA_CURVES
_NAME_BY_OID_NAME = {curve.name: name for name, curve in CA_CURVES.items()}
_HASH_BY_CURVE: dict[str, hashes.HashAlgorithm] = {"P-256": hashes.SHA256(), "P-384": hashes.SHA384()}


def curve_name(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> str:
    """'P-256' or 'P-384' for a key on an accepted curve; PkiError otherwise."""
    name = _NAME_BY_OID_NAME.get(key.curve.name)
    if name is None:
        raise PkiError("unsupported-curve", f"curve {key.curve.name} is not accepted; use P-256 or P-384")
    return name


def ca_curve(name: str) -> ec.EllipticCurve:
    try:
        return CA_CURVES[name.upper()]
    except KeyError:
        raise PkiError("unsupported-curve", f"CA curve {name!r} is not accepted; use P-256 or P-384") from None


def signature_hash(key: ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey) -> hashes.HashAlgorithm:
    """SHA-256 for a P-256 issuer, SHA-384 for a P-384 issuer."""
    return _HASH_BY_CURVE[curve_name(key)]
