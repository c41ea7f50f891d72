"""shared/pki on its own: names, validity nesting, profiles, signing with any key."""

import re
import time
from datetime import UTC, datetime, timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import given
from hypothesis import strategies as st

from shared.pki import (
    Issuer,
    PkiError,
    ValidityError,
    build_root,
    ca_name,
    check_ca_id,
    check_verification_code,
    plan_validity,
    registration_id_problem,
    whole_seconds,
)
from shared.pki.curves import ca_curve, curve_name
from shared.pki.errors import CsrRejected
from shared.pki.names import MAX_REGISTRATION_ID
from shared.pki.validity import MAX_DAYS, Validity, check_ca_validity

from .certrules import check_device, check_intermediate, check_root

DPS_REGISTRATION_ID = re.compile(r"^[a-z0-9]([a-z0-9._:-]{0,62}[a-z0-9])?$")
ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"
NOW = datetime(2026, 6, 1, 12, 0, tzinfo=UTC)


@given(st.one_of(st.text(max_size=70), st.from_regex(DPS_REGISTRATION_ID, fullmatch=True), st.text(ALNUM + "-._:")))
def test_accepted_registration_ids_follow_dps_rules(value):
    """Accepted exactly when DPS's rule (lowercase here) accepts: checked on every example, both ways."""
    assert (registration_id_problem(value) is None) == bool(DPS_REGISTRATION_ID.fullmatch(value))


@given(
    st.text(ALNUM, min_size=1, max_size=1),
    st.text(ALNUM + "-._:", max_size=62),
    st.text(ALNUM, min_size=1, max_size=1),
)
def test_valid_registration_ids_are_accepted(first, middle, last):
    assert registration_id_problem(first + middle + last) is None


@pytest.mark.parametrize(
    ("value", "words"),
    [("", "empty"), ("A", "uppercase"), ("a b", "spaces"), ("-a", "starts or ends"), ("a" * 65, "65 characters")],
)
def test_registration_id_problems_are_named(value, words):
    assert words in registration_id_problem(value)


def test_ca_ids():
    assert check_ca_id("factory-a-2026") == "factory-a-2026"
    for bad in ("Factory", "a_b", "-a", "a" * 49, ""):
        with pytest.raises(PkiError):
            check_ca_id(bad)


class _Cert:
    """Just the validity of an issuer."""

    def __init__(self, start, end):
        self.not_valid_before_utc, self.not_valid_after_utc = start, end
        self.subject = ca_name("Issuer")


@given(
    st.floats(min_value=0.01, max_value=20000),
    st.integers(min_value=-1000, max_value=0),
    st.integers(min_value=1, max_value=8000),
)
def test_child_validity_nests_inside_the_issuer(days, start_offset, end_offset):
    issuer = _Cert(NOW + timedelta(days=start_offset), NOW + timedelta(days=end_offset))
    validity = plan_validity(NOW, days, issuer)
    assert issuer.not_valid_before_utc <= validity.not_before < validity.not_after <= issuer.not_valid_after_utc
    asked_end = whole_seconds(NOW + timedelta(days=days))  # periods are whole seconds: a part-second is no cut
    assert (validity.clamped is not None) == (asked_end > issuer.not_valid_after_utc)


def test_expired_or_future_issuer_signs_nothing():
    with pytest.raises(ValidityError, match="expired"):
        plan_validity(NOW, 1, _Cert(NOW - timedelta(days=10), NOW - timedelta(days=1)))
    with pytest.raises(ValidityError, match="not valid before"):
        plan_validity(NOW, 1, _Cert(NOW + timedelta(days=1), NOW + timedelta(days=10)))
    with pytest.raises(ValidityError):
        plan_validity(NOW, 0)


def _root(curve: ec.EllipticCurve | None = None):
    key = ec.generate_private_key(curve or ec.SECP256R1())
    cert = build_root(ca_name("Root", "Org"), key.public_key(), key, plan_validity(NOW, 3650))
    return cert, key


def test_profiles_with_a_plain_key():
    root, root_key = _root()
    check_root(root)
    root_issuer = Issuer(root, root_key)
    intermediate_key = ec.generate_private_key(ec.SECP384R1())
    intermediate = root_issuer.issue_intermediate(
        ca_name("Intermediate"), intermediate_key.public_key(), root_issuer.validity(NOW, 1000)
    )
    check_intermediate(intermediate, root)
    device_key = ec.generate_private_key(ec.SECP256R1())
    issuer = Issuer(intermediate, intermediate_key)
    device = issuer.issue_device("dev-1", device_key.public_key(), issuer.validity(NOW, 365))
    assert device.signature_hash_algorithm.name == "sha384"  # the P-384 intermediate signs with SHA-384
    check_device(device, intermediate, "dev-1")


class ForeignKey(ec.EllipticCurvePrivateKey):
    """A key held elsewhere: it only signs. This is how a Key Vault key plugs in."""

    def __init__(self):
        self._inner = ec.generate_private_key(ec.SECP256R1())
        self.calls = 0

    def sign(self, data, signature_algorithm):
        self.calls += 1
        return self._inner.sign(data, signature_algorithm)

    def public_key(self):
        return self._inner.public_key()

    @property
    def curve(self):
        return self._inner.curve

    @property
    def key_size(self):
        return self._inner.key_size

    def exchange(self, algorithm, peer_public_key):
        raise NotImplementedError

    def private_numbers(self):
        raise NotImplementedError("never leaves its store")

    def private_bytes(self, encoding, format, encryption_algorithm):
        raise NotImplementedError("never leaves its store")

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def test_any_elliptic_curve_key_signs():
    key = ForeignKey()
    root = build_root(ca_name("Foreign Root"), key.public_key(), key, plan_validity(NOW, 100))
    check_root(root)
    assert key.calls == 1
    issuer = Issuer(root, key)
    device = issuer.issue_device(
        "dev-1", ec.generate_private_key(ec.SECP256R1()).public_key(), issuer.validity(NOW, 10)
    )
    assert key.calls == 2
    device.verify_directly_issued_by(root)


def test_mismatched_keys_are_refused():
    root, _ = _root()
    with pytest.raises(PkiError, match="does not match"):
        Issuer(root, ec.generate_private_key(ec.SECP256R1()))
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(PkiError, match="public half"):
        build_root(ca_name("Root"), ec.generate_private_key(ec.SECP256R1()).public_key(), key, plan_validity(NOW, 1))


def test_hash_follows_the_issuer_curve():
    root, _ = _root(ec.SECP384R1())
    assert isinstance(root.signature_hash_algorithm, hashes.SHA384)
    check_root(root)
    with pytest.raises(PkiError):
        _root(ec.SECP521R1())


def test_issuer_errors_name_the_issuer():
    """An issuer that cannot sign is named by its CN in the error, or as having none."""
    expired = _Cert(NOW - timedelta(days=10), NOW - timedelta(days=1))
    with pytest.raises(ValidityError, match=r"^the issuer 'Issuer' expired at 2026-05-31 12:00:00Z$"):
        plan_validity(NOW, 1, expired)
    expired.subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "Org")])
    with pytest.raises(ValidityError, match=r"^the issuer \(no CN\) expired at "):
        plan_validity(NOW, 1, expired)


@pytest.mark.parametrize("code", ["", None, "a" * 65, "ab_c"])
def test_verification_codes_outside_dps_form_are_refused(code):
    with pytest.raises(PkiError) as refused:
        check_verification_code(code)
    assert refused.value.code == "invalid-verification-code"
    assert "verification code" in refused.value.message


def test_proof_of_possession_is_backdated_ten_minutes():
    key = ec.generate_private_key(ec.SECP256R1())
    cert = build_root(ca_name("Root"), key.public_key(), key, plan_validity(NOW - timedelta(days=1), 3650))
    proof = Issuer(cert, key).issue_proof_of_possession("ABC-123", NOW)
    assert proof.not_valid_before_utc == NOW - timedelta(minutes=10)
    assert proof.not_valid_after_utc == NOW + timedelta(days=1)


CA_NAME_PARTS = [  # (common name, organization, refusal code or None, words the message holds)
    ("x" * 64, "o" * 64, None, ""),
    ("x" * 65, None, "invalid-common-name", "the CA common name must be 1-64 characters, got 65"),
    ("", None, "invalid-common-name", "the CA common name must be 1-64 characters, got 0"),
    ("Line\x00One", None, "invalid-common-name", "the CA common name must be printable characters"),
    ("Line", "o" * 65, "invalid-organization", "the CA organization must be 1-64 characters, got 65"),
    ("Line", "", "invalid-organization", "the CA organization must be 1-64 characters, got 0"),
    ("Line", "Acme ", "invalid-organization", "the CA organization must be printable characters"),
]


@pytest.mark.parametrize(("common_name", "organization", "code", "words"), CA_NAME_PARTS)
def test_ca_name_parts_are_1_to_64_printable_characters(common_name, organization, code, words):
    if code is None:
        name = ca_name(common_name, organization)
        assert name.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == common_name
        assert name.get_attributes_for_oid(NameOID.ORGANIZATION_NAME)[0].value == organization
        return
    with pytest.raises(PkiError) as refused:
        ca_name(common_name, organization)
    assert refused.value.code == code and words in refused.value.message


def test_pki_errors_need_a_code_and_a_message_that_are_text():
    for code, message in ((None, "a message"), ("a-code", None), (None, None)):
        with pytest.raises(TypeError, match=r"^PkiError needs a code and a message that are text$"):
            PkiError(code, message)
    with pytest.raises(TypeError, match=r"^CsrRejected needs a code"):  # names the class raised
        CsrRejected("a-code", b"bytes")


def test_registration_ids_up_to_the_limit_are_accepted_and_every_problem_is_listed():
    assert registration_id_problem("a" * MAX_REGISTRATION_ID) is None
    assert registration_id_problem("a" * (MAX_REGISTRATION_ID + 1)) == "it is 65 characters long, the limit is 64"
    assert (
        registration_id_problem("A b")
        == "it contains spaces, uppercase letters (allowed: lowercase a-z, 0-9 and - . _ :)"
    )


def test_ca_id_refusals_say_invalid_ca_id():
    with pytest.raises(PkiError) as refused:
        check_ca_id("Factory")
    assert refused.value.code == "invalid-ca-id" and "CA ID 'Factory' is not valid" in refused.value.message


def test_curves_outside_p256_and_p384_are_unsupported_curve():
    for refuse in (lambda: ca_curve("P-521"), lambda: curve_name(ec.generate_private_key(ec.SECP521R1()))):
        with pytest.raises(PkiError) as refused:
            refuse()
        assert refused.value.code == "unsupported-curve" and "P-256 or P-384" in refused.value.message


def test_mismatched_keys_are_key_mismatch():
    root, _ = _root()
    with pytest.raises(PkiError) as refused:
        Issuer(root, ec.generate_private_key(ec.SECP256R1()))
    assert refused.value.code == "key-mismatch"
    key = ec.generate_private_key(ec.SECP256R1())
    with pytest.raises(PkiError) as refused:
        build_root(ca_name("Root"), ec.generate_private_key(ec.SECP256R1()).public_key(), key, plan_validity(NOW, 1))
    assert refused.value.code == "key-mismatch"


def test_validity_days_up_to_max_days_are_accepted():
    validity = plan_validity(NOW, MAX_DAYS)
    assert validity.not_after == NOW + timedelta(days=MAX_DAYS)
    with pytest.raises(ValidityError) as refused:
        plan_validity(NOW, MAX_DAYS + 1)
    assert refused.value.code == "invalid-validity"


def test_an_issuer_can_sign_until_its_end_and_from_its_start_only():
    with pytest.raises(ValidityError) as refused:
        plan_validity(NOW, 1, _Cert(NOW - timedelta(days=10), NOW))  # ends this very second
    assert refused.value.code == "issuer-expired"
    with pytest.raises(ValidityError) as refused:
        plan_validity(NOW, 1, _Cert(NOW + timedelta(seconds=1), NOW + timedelta(days=10)))
    assert refused.value.code == "issuer-not-yet-valid"
    assert plan_validity(NOW, 1, _Cert(NOW, NOW + timedelta(seconds=1))).not_after == NOW + timedelta(seconds=1)


def test_a_shortened_period_says_how_many_days_it_keeps():
    issuer = _Cert(NOW - timedelta(days=1), NOW + timedelta(hours=25, minutes=12))  # 1.05 days left
    assert plan_validity(NOW, 10, issuer).clamped == (
        "validity cut to end with the issuer 'Issuer' at 2026-06-02 13:12:00Z (1.1 days instead of 10)"
    )


def test_a_ca_of_exactly_one_day_is_long_enough():
    day = Validity(NOW, NOW + timedelta(days=1))
    assert check_ca_validity(day) is day
    with pytest.raises(ValidityError) as refused:
        check_ca_validity(Validity(NOW, NOW + timedelta(days=1, seconds=-1)))
    assert refused.value.code == "validity-too-short"
    assert refused.value.message.endswith("this one would end at 2026-06-02 11:59:59Z")  # nothing was cut


def test_whole_seconds_are_utc_in_any_local_zone(monkeypatch):
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    try:
        moment = whole_seconds(datetime(2026, 6, 1, 12, 0, 0, 999, tzinfo=UTC))
        assert f"{moment:%Y-%m-%d %H:%M:%S}" == "2026-06-01 12:00:00" and moment.utcoffset() == timedelta(0)
    finally:
        monkeypatch.undo()
        time.tzset()


def test_devices_of_different_periods_from_one_issuer_each_get_their_own():
    root, root_key = _root()
    issuer = Issuer(root, root_key)
    periods = [issuer.validity(NOW, days) for days in (10, 20, 10)]
    for validity in periods:
        device = issuer.issue_device("dev-1", ec.generate_private_key(ec.SECP256R1()).public_key(), validity)
        assert (device.not_valid_before_utc, device.not_valid_after_utc) == (validity.not_before, validity.not_after)
