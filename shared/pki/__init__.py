"""Pure X.509 for the device CA: profiles, CSR policy, validity rules. No I/O, no Azure."""

from .csr import DeviceRequest, check_device_csr, load_csr
from .curves import CA_CURVES, ca_curve, curve_name, signature_hash
from .errors import CsrRejected, PkiError, ValidityError
from .names import check_ca_id, check_device_id, check_verification_code, registration_id_problem
from .profiles import Issuer, build_root, ca_name, new_serial, public_key_sha256
from .validity import Validity, plan_validity, whole_seconds

__all__ = [
    "CA_CURVES",
    "CsrRejected",
    "DeviceRequest",
    "Issuer",
    "PkiError",
    "Validity",
    "ValidityError",
    "build_root",
    "ca_curve",
    "ca_name",
    "check_ca_id",
    "check_device_csr",
    "check_device_id",
    "check_verification_code",
    "curve_name",
    "load_csr",
    "new_serial",
    "plan_validity",
    "public_key_sha256",
    "registration_id_problem",
    "signature_hash",
    "whole_seconds",
]
