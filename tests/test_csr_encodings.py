"""CSRs as devices and tools send them: each input form and encoding oddity is accepted, normalised with a note,
or refused with a code naming the field (the README's "CSRs the CA accepts" table lists the same cases); and no
mutation of a good CSR makes `check_device_csr` raise anything but CsrRejected."""

import base64
import hashlib
import subprocess
import tempfile
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, x25519
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pyasn1.codec.der import decoder as der_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.type import univ
from pyasn1_modules import rfc2986

from shared.pki import CsrRejected, DeviceRequest, check_device_csr, load_csr
from shared.pki import csr as csr_module

from .csrs import device_key, make_csr, rsa_key

DATA = Path(__file__).parent / "data"
NRF91_DEVICE = "b3fb1364-3cb5-bd46-9e80-ca0916643193"  # the CN the sample modem put in its CSR

SEQUENCE, SET, INTEGER, BIT_STRING = 0x30, 0x31, 0x02, 0x03
UTF8, PRINTABLE, T61, IA5, UNIVERSAL, BMP = 0x0C, 0x13, 0x14, 0x16, 0x1C, 0x1E
ECDSA_SHA256 = "1.2.840.10045.4.3.2"
VERSION_0 = bytes([INTEGER, 1, 0])
EMPTY_ATTRIBUTES = b"\xa0\x00"
PRINTABLE_SET = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?"  # X.680 §41.4


# ---- building CSRs byte by byte, so that each oddity is exactly the one under test --------------------------------


def tlv(tag: int, content: bytes, length_octets: int | None = None) -> bytes:
    """A TLV in DER, or with its length in `length_octets` long-form octets (BER), or indefinite (0)."""
    if length_octets == 0:
        return bytes([tag | 0x20, 0x80]) + content + b"\x00\x00"
    size = len(content)
    if length_octets is None and size < 0x80:
        return bytes([tag, size]) + content
    octets = length_octets or (size.bit_length() + 7) // 8
    return bytes([tag, 0x80 | octets]) + size.to_bytes(octets, "big") + content


def oid(dotted: str) -> bytes:
    return der_encoder.encode(univ.ObjectIdentifier(dotted))


def algorithm(dotted: str = ECDSA_SHA256, parameters: bytes = b"") -> bytes:
    return tlv(SEQUENCE, oid(dotted) + parameters)


def name(value: bytes = b"dev-1", tag: int = UTF8, attribute: str = "2.5.4.3", encoded: bytes | None = None) -> bytes:
    """A subject of one attribute (the CN by default): `encoded` as it is, or `value` under `tag`."""
    pair = tlv(SEQUENCE, oid(attribute) + (encoded if encoded is not None else tlv(tag, value)))
    return tlv(SEQUENCE, tlv(SET, pair))


def spki(key, point: bytes | None = None) -> bytes:
    """The key's SubjectPublicKeyInfo, with its point replaced by `point` when given."""
    info = key.public_key().public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    if point is None:
        return info
    decoded, _ = der_decoder.decode(info, asn1Spec=rfc2986.SubjectPublicKeyInfo())
    decoded["subjectPublicKey"] = univ.BitString.fromOctetString(point)
    return der_encoder.encode(decoded)


def request_info(
    key: ec.EllipticCurvePrivateKey,
    version: bytes = VERSION_0,
    subject: bytes | None = None,
    public_key: bytes | None = None,
    attributes: bytes = EMPTY_ATTRIBUTES,
    length_octets: int | None = None,
) -> bytes:
    content = version + (subject or name()) + (public_key or spki(key)) + attributes
    return tlv(SEQUENCE, content, length_octets)


def signed(
    key: ec.EllipticCurvePrivateKey,
    info: bytes,
    signature_algorithm: bytes | None = None,
    signature: bytes | None = None,
    signed_over: bytes | None = None,
    length_octets: int | None = None,
) -> bytes:
    """A CertificationRequest carrying `info`, signed over `signed_over` (by default `info` itself)."""
    signature = signature or key.sign(signed_over or info, ec.ECDSA(hashes.SHA256()))
    content = info + (signature_algorithm or algorithm()) + tlv(BIT_STRING, b"\x00" + signature)
    return tlv(SEQUENCE, content, length_octets)


def plain(key: ec.EllipticCurvePrivateKey, **info_fields) -> bytes:
    return signed(key, request_info(key, **info_fields))


def compressed_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.public_key().public_bytes(serialization.Encoding.X962, serialization.PublicFormat.CompressedPoint)


def hybrid_point(key: ec.EllipticCurvePrivateKey) -> bytes:
    numbers = key.public_key().public_numbers()
    return bytes([6 | (numbers.y & 1)]) + numbers.x.to_bytes(32, "big") + numbers.y.to_bytes(32, "big")


def padded_integer_signature(key: ec.EllipticCurvePrivateKey, info: bytes) -> bytes:
    """A valid ECDSA signature re-encoded with a needless leading zero octet in r: not DER."""
    r, s = decode_dss_signature(key.sign(info, ec.ECDSA(hashes.SHA256())))

    def integer(value: int, pad: bool = False) -> bytes:
        return tlv(INTEGER, b"\x00" * pad + value.to_bytes(value.bit_length() // 8 + 1, "big"))

    return tlv(SEQUENCE, integer(r, pad=True) + integer(s))


def explicit_curve_csr() -> bytes:
    """openssl writes explicit curve parameters (specifiedCurve) when asked; cryptography reads them as P-256."""
    with tempfile.TemporaryDirectory() as work:
        key_file = Path(work) / "explicit.key"
        make_key = ["openssl", "ecparam", "-name", "prime256v1", "-param_enc", "explicit", "-genkey", "-noout"]
        subprocess.run([*make_key, "-out", str(key_file)], check=True, capture_output=True)
        request = ["openssl", "req", "-new", "-key", str(key_file), "-subj", "/CN=dev-1", "-outform", "DER"]
        return subprocess.run(request, check=True, capture_output=True).stdout


def unused_bits_signature(key: ec.EllipticCurvePrivateKey) -> bytes:
    """A signature BIT STRING declaring one unused bit: a signature whose last bit is zero, so nothing is lost."""
    info = request_info(key)
    while True:
        signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
        if not signature[-1] & 1:
            return tlv(SEQUENCE, info + algorithm() + tlv(BIT_STRING, b"\x01" + signature))


def pem(der: bytes, label: str = "CERTIFICATE REQUEST", newline: str = "\n") -> bytes:
    body = base64.encodebytes(der).decode().replace("\n", newline)
    return f"-----BEGIN {label}-----{newline}{body}-----END {label}-----{newline}".encode()


def openssl_text_dump(der: bytes) -> bytes:
    """What `openssl req -text` prints: a text dump, then the PEM block."""
    command = ["openssl", "req", "-inform", "DER", "-text"]
    return subprocess.run(command, input=der, check=True, capture_output=True).stdout


def private_key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


# ---- the table ------------------------------------------------------------------------------------------------------

# (case, CSR maker taking the device key, words of the note it must add, or None for no note)
ACCEPTED = [
    ("clean DER", lambda k: plain(k), None),
    ("clean PEM", lambda k: pem(plain(k)), None),
    ("PEM with CRLF", lambda k: pem(plain(k), newline="\r\n"), None),
    ("NEW CERTIFICATE REQUEST label", lambda k: pem(plain(k), "NEW CERTIFICATE REQUEST", "\r\n"), None),
    ("UTF-8 byte-order mark", lambda k: b"\xef\xbb\xbf" + pem(plain(k)), None),
    ("UTF-16 byte-order mark", lambda k: ("\ufeff" + pem(plain(k)).decode()).encode("utf-16-le"), None),
    ("openssl req -text output", lambda k: openssl_text_dump(plain(k)), None),
    ("text after the PEM block", lambda k: pem(plain(k)) + b"saved by the line tester\n", None),
    ("base64 without armour", lambda k: base64.b64encode(plain(k)), None),
    ("base64 over lines", lambda k: base64.encodebytes(plain(k)), None),
    ("base64url without padding", lambda k: base64.urlsafe_b64encode(plain(k)).rstrip(b"="), None),
    ("base64 with surplus '=' padding", lambda k: _base64_with_surplus_padding(k), None),
    ("base64 ending in X", lambda k: _base64_ending_in_x(k), None),
    ("a certificate beside the CSR", lambda k: pem(plain(k)) + pem(b"\x30\x00", "CERTIFICATE"), "CERTIFICATE block"),
    ("CN as PrintableString", lambda k: plain(k, subject=name(tag=PRINTABLE)), None),
    ("CN as IA5String", lambda k: plain(k, subject=name(tag=IA5)), None),
    ("CN as T61String", lambda k: plain(k, subject=name(tag=T61)), None),
    ("CN as BMPString", lambda k: plain(k, subject=name("dev-1".encode("utf-16-be"), BMP)), None),
    ("CN as UniversalString", lambda k: plain(k, subject=name("dev-1".encode("utf-32-be"), UNIVERSAL)), None),
    (
        "explicit NULL signature parameters",
        lambda k: signed(k, request_info(k), algorithm(parameters=b"\x05\x00")),
        "NULL",
    ),
    ("version 1", lambda k: plain(k, version=bytes([INTEGER, 1, 1])), "version field was 1"),
    ("no attributes field", lambda k: plain(k, attributes=b""), "no attributes field"),
    ("outer long-form length", lambda k: signed(k, request_info(k), length_octets=3), "outer SEQUENCE was BER"),
    ("outer indefinite length", lambda k: signed(k, request_info(k), length_octets=0), "outer SEQUENCE was BER"),
    ("signed part long-form length", lambda k: plain(k, length_octets=2), "signed part was BER"),
    ("signed part indefinite length", lambda k: plain(k, length_octets=0), "signed part was BER"),
    (
        "subject indefinite lengths",
        lambda k: plain(
            k, subject=tlv(SEQUENCE, tlv(SET, tlv(SEQUENCE, oid("2.5.4.3") + tlv(UTF8, b"dev-1"), 0), 0), 0)
        ),
        "signed part was BER",
    ),
    (
        "CN as constructed indefinite UTF8String",
        lambda k: plain(k, subject=name(encoded=tlv(UTF8, tlv(UTF8, b"dev") + tlv(UTF8, b"-1"), 0))),
        "signed part was BER",
    ),
    ("CN long-form length", lambda k: plain(k, subject=name(encoded=tlv(UTF8, b"dev-1", 1))), "signed part was BER"),
    ("zero bytes after the DER", lambda k: plain(k) + b"\x00" * 16, "16 bytes of padding after the end"),
    ("newline after the DER", lambda k: plain(k) + b"\n", "1 byte of padding after the end"),
    ("CRLF after the DER", lambda k: plain(k) + b"\r\n", "2 bytes of padding after the end"),
    ("an odd CSR of exactly 8 KiB", lambda k: plain(k).ljust(8192, b"\x00"), "of padding after the end"),
    (
        "signature BIT STRING long-form length",
        lambda k: _signature_length_octets(k, request_info(k), 1),
        "outer SEQUENCE was BER",
    ),
    ("compressed EC point", lambda k: plain(k, public_key=spki(k, compressed_point(k))), "compressed point"),
    (
        "CN PrintableString with '_'",
        lambda k: plain(k, subject=name(b"dev_1", PRINTABLE)),
        "PrintableString holding '_'",
    ),
    (
        "O PrintableString with '@' and an underscore",
        lambda k: plain(k, subject=_subject(name(), name(b"a_b@c", PRINTABLE, attribute="2.5.4.10"))),
        "PrintableString holding '@_'",
    ),
    (
        "O PrintableString of every PrintableString character",
        lambda k: plain(
            k, subject=_subject(name(), name(PRINTABLE_SET, PRINTABLE, attribute="2.5.4.10")), attributes=b""
        ),
        "no attributes field",
    ),
    ("CN UTF8String with '_'", lambda k: plain(k, subject=name(b"dev_1"), attributes=b""), "no attributes field"),
    ("signature BIT STRING with unused zero bits", unused_bits_signature, None),
]

# (case, CSR maker taking the device key, error code, words the message must contain)
REFUSED = [
    ("version 2", lambda k: plain(k, version=bytes([INTEGER, 1, 2])), "invalid-csr-version", "version is 2"),
    ("version -1", lambda k: plain(k, version=bytes([INTEGER, 1, 0xFF])), "invalid-csr-version", "version is -1"),
    (
        "version 2**31, a 32-bit number",
        lambda k: plain(k, version=tlv(INTEGER, b"\x00\x80\x00\x00\x00")),
        "invalid-csr-version",
        "version is 2147483648;",
    ),
    (
        "version 2**32, a 33-bit number",
        lambda k: plain(k, version=tlv(INTEGER, b"\x01\x00\x00\x00\x00")),
        "invalid-csr-version",
        "too large",
    ),
    (
        "version not an INTEGER",
        lambda k: plain(k, version=tlv(0x04, b"\x00")),
        "malformed-csr",
        "the CSR's version cannot be decoded",
    ),
    (
        "huge version",
        lambda k: plain(k, version=tlv(INTEGER, b"\x01" + b"\x00" * 3000)),
        "invalid-csr-version",
        "too large",
    ),
    ("CN not valid UTF-8", lambda k: plain(k, subject=name(b"dev-\xff")), "invalid-cn", "CN is not valid UTF-8"),
    ("CN UTF-8 surrogate", lambda k: plain(k, subject=name(b"dev-\xed\xa0\x80")), "invalid-cn", "not valid UTF-8"),
    ("CN odd-length BMPString", lambda k: plain(k, subject=name(b"\x00d\x00", BMP)), "invalid-cn", "BMPString"),
    ("CN IA5String not ASCII", lambda k: plain(k, subject=name(b"dev-\xe9", IA5)), "invalid-cn", "ASCII (IA5String)"),
    ("CN not a string", lambda k: plain(k, subject=name(encoded=tlv(INTEGER, b"\x01"))), "invalid-cn", "not a string"),
    (
        "O not valid UTF-8",
        lambda k: plain(k, subject=tlv(SEQUENCE, name()[2:] + name(b"\xc3(", attribute="2.5.4.10")[2:])),
        "invalid-subject",
        "subject attribute O is not valid UTF-8",
    ),
    (
        "other ECDSA signature parameters",
        lambda k: signed(k, request_info(k), algorithm(parameters=tlv(0x04, b""))),
        "invalid-signature-algorithm",
        "MUST be absent",
    ),
    (
        "RSA algorithm on an ECDSA signature",
        lambda k: signed(k, request_info(k), algorithm("1.2.840.113549.1.1.11", b"\x05\x00")),
        "bad-signature",
        "not ECDSA",
    ),
    (
        "non-DER signature integers",
        lambda k: signed(k, request_info(k), signature=padded_integer_signature(k, request_info(k))),
        "bad-signature",
        "does not verify",
    ),
    (
        "signed over the DER, sent as BER",
        lambda k: signed(k, request_info(k, length_octets=2), signed_over=request_info(k)),
        "bad-signature",
        "does not verify",
    ),
    (
        "signed as version 0, sent as version 1",
        lambda k: signed(k, request_info(k, version=bytes([INTEGER, 1, 1])), signed_over=request_info(k)),
        "bad-signature",
        "does not verify",
    ),
    (
        "hybrid EC point",
        lambda k: plain(k, public_key=spki(k, hybrid_point(k))),
        "invalid-public-key",
        "RFC 5480 §2.2",
    ),
    (
        "EC point of an unknown form",
        lambda k: plain(k, public_key=spki(k, b"\x05" + b"\x01" * 64)),
        "invalid-public-key",
        "EC public key starts with 0x05",
    ),
    (
        "EC point of 7 bits",
        lambda k: plain(k, public_key=_spki_bits(spki(k), tlv(BIT_STRING, b"\x01\x04"))),
        "invalid-public-key",
        "is not whole octets; RFC 5480 §2.2",
    ),
    (
        "EC point not on the curve",
        lambda k: plain(k, public_key=spki(k, b"\x04" + b"\x01" * 64)),
        "invalid-public-key",
        "",
    ),
    ("explicit curve parameters", lambda k: explicit_curve_csr(), "unsupported-curve", "specifiedCurve"),
    (
        "no curve named",
        lambda k: plain(k, public_key=tlv(SEQUENCE, algorithm("1.2.840.10045.2.1", b"\x05\x00") + spki(k)[-68:])),
        "unsupported-curve",
        "names no curve",
    ),
    (
        "O not a string",
        lambda k: plain(
            k, subject=tlv(SEQUENCE, name()[2:] + name(encoded=tlv(INTEGER, b"\x05"), attribute="2.5.4.10")[2:])
        ),
        "invalid-subject",
        "subject attribute O is not a string",
    ),
    (
        "an attribute of three parts",
        lambda k: plain(k, subject=tlv(SEQUENCE, tlv(SET, tlv(SEQUENCE, oid("2.5.4.3") + tlv(UTF8, b"dev-1") * 2)))),
        "invalid-subject",
        "not a type and a value",
    ),
    (
        "an RSA key, read by the tolerant reader",
        lambda k: signed(k, request_info(k, public_key=spki(rsa_key())), algorithm(parameters=b"\x05\x00")),
        "unsupported-key",
        "the CSR's key is RSA",
    ),
    (
        "a key algorithm cryptography does not know (SM2), read by the tolerant reader",
        lambda k: signed(
            k,
            request_info(
                k,
                public_key=tlv(
                    SEQUENCE, algorithm("1.2.156.10197.1.301") + tlv(BIT_STRING, b"\x00\x04" + b"\x01" * 64)
                ),
            ),
            algorithm(parameters=b"\x05\x00"),
        ),
        "unsupported-key",
        "key type is not supported",
    ),
    ("indefinite length never ended", lambda k: b"\x30\x80" + plain(k)[3:], "truncated-csr", "end-of-contents"),
    ("two %KEYGEN answers", lambda k: b'%KEYGEN: "a.b"\r\n%KEYGEN: "c.d"\r\nOK\r\n', "multiple-csrs", "2 %KEYGEN"),
    ("%KEYGEN without quotes", lambda k: b"%KEYGEN: MIIB.abc\r\nOK\r\n", "not-a-csr", "not a PKCS#10"),
    ("UTF-16 that is not", lambda k: b"\xff\xfe-\x00-\x00x", "not-a-csr", "not a PKCS#10"),
    ("a private key", lambda k: private_key_pem(k), "private-key-in-body", "PRIVATE KEY"),
    ("a private key and the CSR", lambda k: private_key_pem(k) + pem(plain(k)), "private-key-in-body", "PRIVATE KEY"),
    ("a PEM public key", lambda k: pem(spki(k), "PUBLIC KEY"), "not-a-csr", "got PUBLIC KEY"),
    ("two CSRs", lambda k: pem(plain(k)) + pem(plain(k)), "multiple-csrs", "2 PEM CERTIFICATE REQUEST blocks"),
    ("PEM without END", lambda k: pem(plain(k))[:-40], "truncated-csr", "no END line"),
    ("PEM body not base64", lambda k: _pem_around(b"@@ not base64 @@"), "malformed-csr", "not valid base64"),
    ("DER cut short", lambda k: plain(k)[:-10], "truncated-csr", "cut short"),
    ("a SEQUENCE cut short, not a CSR", lambda k: b"\x30\x03\x02\x01", "not-a-csr", "not a PKCS#10"),
    (
        "cut short as a CSR begins",
        lambda k: b"\x30\x10\x30\x0e\x02\x01\x00",
        "truncated-csr",
        "its outer SEQUENCE declares 16 bytes, 5 follow",
    ),
    (
        "a field cut short inside the certificationRequestInfo",
        lambda k: signed(k, tlv(SEQUENCE, VERSION_0 + b"\x02\x05\x00")),
        "malformed-csr",
        "the CSR's certificationRequestInfo cannot be decoded",
    ),
    (
        "a CSR in a SET, not a SEQUENCE, in PEM",
        lambda k: pem(b"\x31" + plain(k)[1:]),
        "not-a-csr",
        "not a PKCS#10",
    ),
    (
        "cut short, a SEQUENCE in a SEQUENCE opening with no INTEGER",
        lambda k: b"\x30\x10\x30\x0e\x04\x01\x00",
        "not-a-csr",
        "not a PKCS#10",
    ),
    ("hex", lambda k: plain(k).hex().encode(), "not-a-csr", "not a PKCS#10"),
    ("a DER certificate", lambda k: _certificate_der(k), "not-a-csr", "X.509 certificate"),
    ("an odd CSR over 8 KiB", lambda k: plain(k) + b"\x00" * 8192, "csr-too-large", "8192 bytes"),
    ("a byte-order mark only", lambda k: b"\xef\xbb\xbf \n", "empty-csr", "empty"),
    (
        "five fields in the signed part",
        lambda k: plain(k, attributes=EMPTY_ATTRIBUTES + tlv(INTEGER, b"\x00")),
        "malformed-csr",
        "has 5 fields",
    ),
    (
        "subject not a Name",
        lambda k: plain(k, subject=tlv(SEQUENCE, tlv(INTEGER, b"\x01"))),
        "malformed-csr",
        "the CSR's subject cannot be decoded",
    ),
    (
        "subject a SET, not a SEQUENCE",
        lambda k: plain(k, subject=tlv(SET, name()[2:])),
        "malformed-csr",
        "the CSR's subject cannot be decoded",
    ),
    (
        "subject attribute a SET, not a SEQUENCE",
        lambda k: plain(k, subject=tlv(SEQUENCE, tlv(SET, tlv(SET, oid("2.5.4.3") + tlv(UTF8, b"dev-1"))))),
        "malformed-csr",
        "the CSR's subject cannot be decoded",
    ),
    (
        "subject attribute type not an OID",
        lambda k: plain(
            k, subject=_subject(name(), tlv(SEQUENCE, tlv(SET, tlv(SEQUENCE, VERSION_0 + tlv(UTF8, b"x")))))
        ),
        "malformed-csr",
        "the CSR's subject cannot be decoded",
    ),
    (
        "subject attribute unknown by name, not valid UTF-8",
        lambda k: plain(k, subject=_subject(name(), name(b"\xc3(", attribute="2.5.4.97"))),
        "invalid-subject",
        "subject attribute 2.5.4.97 is not valid UTF-8",
    ),
    (
        "an empty RDN in the subject",
        lambda k: plain(k, subject=_subject(name(), tlv(SEQUENCE, tlv(SET, b"")))),
        "invalid-subject",
        "the CSR's subject has an empty RDN",
    ),
    (
        "attributes not a SET OF Attribute",
        lambda k: plain(k, attributes=tlv(0xA0, VERSION_0)),
        "malformed-csr",
        "the CSR's attributes cannot be decoded",
    ),
    (
        "certificationRequestInfo a SET, not a SEQUENCE",
        lambda k: signed(k, tlv(SET, request_info(k)[2:])),
        "malformed-csr",
        "the CSR's certificationRequestInfo cannot be decoded",
    ),
    (
        "subjectPKInfo not a SubjectPublicKeyInfo",
        lambda k: plain(k, public_key=tlv(SEQUENCE, VERSION_0)),
        "malformed-csr",
        "the CSR's subjectPKInfo cannot be decoded",
    ),
    (
        "signatureAlgorithm not an AlgorithmIdentifier",
        lambda k: signed(k, request_info(k), tlv(SEQUENCE, VERSION_0)),
        "malformed-csr",
        "the CSR's signatureAlgorithm cannot be decoded",
    ),
    (
        "signature an OCTET STRING, not a BIT STRING",
        lambda k: _signed_in_octet_string(k),
        "malformed-csr",
        "the CSR's signature cannot be decoded",
    ),
    (
        "signature an OCTET STRING, in a BER outer SEQUENCE",
        lambda k: _signed_in_octet_string(k, length_octets=2),
        "malformed-csr",
        "the CSR's signature cannot be decoded",
    ),
    ("a second CSR after the DER", lambda k: plain(k) + plain(k), "trailing-data", "not padding"),
    ("garbage after the DER", lambda k: plain(k) + b"\x05\x00junk", "trailing-data", "not padding"),
    (
        "a PEM CSR and a %KEYGEN answer",
        lambda k: pem(plain(k)) + b'%KEYGEN: "' + base64.urlsafe_b64encode(plain(k)) + b'"\nOK\n',
        "multiple-csrs",
        "%KEYGEN",
    ),
    (
        "hybrid point, with the plain key hidden in an attribute",
        lambda k: plain(k, public_key=spki(k, hybrid_point(k)), attributes=_attribute_holding(spki(k))),
        "invalid-public-key",
        "RFC 5480 §2.2 allows only",
    ),
]


def _subject(*names: bytes) -> bytes:
    """A subject of the RDNs of each of `names` (subjects made by `name`), in order."""
    return tlv(SEQUENCE, b"".join(one[2:] for one in names))


def _base64_with_surplus_padding(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Bare base64 of a CSR with one '=' more than its last, partial group needs (which base64 itself refuses)."""
    while True:
        der = plain(key)
        if len(der) % 3:
            return base64.b64encode(der) + b"="


def _base64_ending_in_x(key: ec.EllipticCurvePrivateKey) -> bytes:
    """Bare base64 of a CSR whose last character is X (no padding): only '=' is padding, not the letters."""
    while True:
        text = base64.b64encode(plain(key))
        if text.endswith(b"X"):
            return text


def _signature_length_octets(key: ec.EllipticCurvePrivateKey, info: bytes, length_octets: int) -> bytes:
    """A CSR whose signature BIT STRING has its length in `length_octets` long-form octets (BER)."""
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    return tlv(SEQUENCE, info + algorithm() + tlv(BIT_STRING, b"\x00" + signature, length_octets))


def _signed_in_octet_string(key: ec.EllipticCurvePrivateKey, length_octets: int | None = None) -> bytes:
    """A CSR whose valid signature is sent as an OCTET STRING (tag 0x04) instead of a BIT STRING."""
    info = request_info(key)
    signature = key.sign(info, ec.ECDSA(hashes.SHA256()))
    return tlv(SEQUENCE, info + algorithm() + tlv(0x04, signature), length_octets)


def _spki_bits(info: bytes, bit_string: bytes) -> bytes:
    """`info` (a SubjectPublicKeyInfo) with its BIT STRING replaced by `bit_string` as it is."""
    algorithm_end = 2 + info[3] + 2  # SEQUENCE header, then the AlgorithmIdentifier's TLV
    return tlv(SEQUENCE, info[2:algorithm_end] + bit_string)


def _attribute_holding(octets: bytes) -> bytes:
    """An attributes field whose one attribute's value is `octets` in an OCTET STRING."""
    attribute = tlv(SEQUENCE, oid("1.2.840.113549.1.9.7") + tlv(0x31, tlv(0x04, octets)))
    return tlv(0xA0, attribute)


def _pem_around(body: bytes) -> bytes:
    return b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"\n-----END CERTIFICATE REQUEST-----\n"


def _certificate_der(key: ec.EllipticCurvePrivateKey) -> bytes:
    from datetime import UTC, datetime, timedelta

    from cryptography import x509
    from cryptography.x509.oid import NameOID

    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "dev-1")])
    now = datetime.now(UTC)
    builder = x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
    builder = builder.serial_number(1).not_valid_before(now).not_valid_after(now + timedelta(days=1))
    return builder.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)


def _key_hash(key: ec.EllipticCurvePrivateKey) -> str:
    return hashlib.sha256(spki(key)).hexdigest()


@pytest.mark.parametrize(("case", "make", "note"), ACCEPTED, ids=[row[0] for row in ACCEPTED])
def test_accepted(case, make, note):
    key = device_key()
    device_id = "dev_1" if "'_'" in case else "dev-1"
    request = check_device_csr(make(key), device_id)
    assert request.device_id == device_id
    assert request.public_key_sha256 == _key_hash(key)  # the key that signed, whatever its encoding in the CSR
    if note is None:
        assert request.notes == ()
    else:
        assert len(request.notes) == 1 and note in request.notes[0], request.notes
        assert "\n" not in request.notes[0]


@pytest.mark.parametrize(("case", "make", "code", "words"), REFUSED, ids=[row[0] for row in REFUSED])
def test_refused(case, make, code, words):
    key = device_key()
    data = make(key)
    with pytest.raises(CsrRejected) as raised:
        check_device_csr(data, "dev-1")
    assert (raised.value.code, words in raised.value.message) == (code, True), raised.value.message
    assert "\n" not in raised.value.message
    if code not in {"bad-signature", "unsupported-key"}:  # load_csr reads; check_device_csr judges key and signature
        with pytest.raises(CsrRejected):
            load_csr(data)


@pytest.mark.parametrize("prefix", [b"\x02", b"\x03"], ids=["even y", "odd y"])
def test_compressed_points_of_either_parity_are_accepted(prefix):
    """RFC 5480 §2.2: 0x02 and 0x03 both start a compressed point (the parity of y)."""
    key = next(key for key in iter(device_key, None) if compressed_point(key)[:1] == prefix)
    request = check_device_csr(plain(key, public_key=spki(key, compressed_point(key))), "dev-1")
    assert request.public_key_sha256 == _key_hash(key)
    assert len(request.notes) == 1 and "compressed point" in request.notes[0], request.notes


def test_an_empty_subject_is_read_tolerantly():
    """A subject of no RDNs (an empty SEQUENCE, not one of indefinite length) is read, then refused for its CN."""
    data = plain(device_key(), subject=tlv(SEQUENCE, b""), attributes=b"")  # no attributes: the tolerant reader
    assert load_csr(data).subject.rfc4514_string() == ""
    with pytest.raises(CsrRejected) as raised:
        check_device_csr(data, "dev-1")
    assert raised.value.code == "missing-cn"


def test_refusing_another_pem_kind_never_echoes_it():
    secret = private_key_pem(device_key())
    for data in (secret, pem(b"\x30\x03\x02\x01\x01", "CERTIFICATE")):
        with pytest.raises(CsrRejected) as raised:
            check_device_csr(data, "dev-1")
        body = data.split(b"-----")[2].split()[0].decode()
        assert body[:16] not in raised.value.message


# ---- the nRF91 modem ----------------------------------------------------------------------------------------------


def _nrf91_response() -> bytes:
    return (DATA / "nrf91-keygen-response.txt").read_bytes()


def _nrf91_der() -> bytes:
    return (DATA / "nrf91-keygen-csr.der").read_bytes()


def _nrf91_key_hash() -> str:
    request, _ = der_decoder.decode(_nrf91_der(), asn1Spec=rfc2986.CertificationRequest())
    return hashlib.sha256(der_encoder.encode(request["certificationRequestInfo"]["subjectPKInfo"])).hexdigest()


NRF91_FORMS = [
    ("as printed", lambda: _nrf91_response()),
    (
        "inside the AT answer",
        lambda: b'AT%KEYGEN=16842753,2,0\r\n%KEYGEN: "' + _nrf91_response().strip() + b'"\r\nOK\r\n',
    ),
    ("with its OK line", lambda: _nrf91_response().strip() + b"\r\nOK\r\n"),
    ("the CSR part alone", lambda: _nrf91_response().split(b".")[0]),
    ("the CSR as DER", lambda: _nrf91_der()),
    ("the CSR as PEM", lambda: pem(_nrf91_der())),
    ("the CSR as base64", lambda: base64.b64encode(_nrf91_der())),
]


@pytest.mark.parametrize(("form", "make"), NRF91_FORMS, ids=[row[0] for row in NRF91_FORMS])
def test_nrf91_keygen_output_is_accepted(form, make):
    data = make()
    request = check_device_csr(data, NRF91_DEVICE)
    assert request.public_key_sha256 == _nrf91_key_hash()
    assert request.curve == "P-256"
    assert any("explicit NULL parameters" in note for note in request.notes)
    carries_attestation = b"." in data and not data.startswith(b"\x30")
    assert any("attestation" in note and "not verified" in note for note in request.notes) == carries_attestation


def test_the_nrf91_sample_is_what_openssl_accepts_and_cryptography_refuses():
    """The reason for the tolerant path: openssl verifies the modem's CSR, cryptography will not parse it."""
    from cryptography import x509

    with pytest.raises(ValueError):
        x509.load_der_x509_csr(_nrf91_der())
    command = ["openssl", "req", "-verify", "-noout", "-inform", "DER"]
    verified = subprocess.run(command, input=_nrf91_der(), capture_output=True, check=False)
    assert verified.returncode == 0, verified.stderr
    assert _nrf91_response().split(b".")[0] == base64.urlsafe_b64encode(_nrf91_der()).rstrip(b"=")


def test_load_csr_returns_a_readable_normalised_request():
    csr = load_csr(_nrf91_response())
    assert csr.subject.rfc4514_string() == f"CN={NRF91_DEVICE}"
    assert csr.signature_algorithm_oid.dotted_string == ECDSA_SHA256


# ---- the fast path ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("encoding", [serialization.Encoding.PEM, serialization.Encoding.DER])
def test_a_clean_csr_never_reaches_the_tolerant_reader(monkeypatch, encoding):
    def refuse(*_):
        raise AssertionError("the tolerant reader ran on a clean CSR")

    monkeypatch.setattr(csr_module, "unwrap_csr", refuse)
    monkeypatch.setattr(csr_module, "normalise_csr", refuse)
    # a long subject makes the signed part 256 octets or more: its SEQUENCE header is then 4 octets, not 3
    long_subject = [
        x509.NameAttribute(oid, text * 60)
        for oid, text in (
            (NameOID.ORGANIZATION_NAME, "o"),
            (NameOID.ORGANIZATIONAL_UNIT_NAME, "u"),
            (NameOID.LOCALITY_NAME, "l"),
        )
    ]
    for curve in (ec.SECP256R1(), ec.SECP384R1()):
        for extra in ((), long_subject):
            csr = make_csr("dev-fast", key=device_key(curve), extra_attributes=extra, encoding=encoding)
            request = check_device_csr(csr, "dev-fast")
            assert request.notes == ()
    assert x509.load_pem_x509_csr(make_csr("dev-fast", extra_attributes=long_subject)).tbs_certrequest_bytes[1] == 0x82


def test_explicit_curve_parameters_are_refused_although_cryptography_reads_them():
    from cryptography import x509

    data = explicit_curve_csr()
    assert x509.load_der_x509_csr(data).public_key().curve.name == "secp256r1"
    with pytest.raises(CsrRejected) as raised:
        check_device_csr(data, "dev-1")
    assert raised.value.code == "unsupported-curve"


def test_device_request_notes_default_to_none():
    key = device_key().public_key()
    assert DeviceRequest("dev-1", key, "00", "P-256").notes == ()


# ---- mutations ----------------------------------------------------------------------------------------------------

GOOD = {
    name: make_csr("dev-1", key=key, encoding=serialization.Encoding.DER)
    for name, key in (("P-256", device_key(ec.SECP256R1())), ("P-384", device_key(ec.SECP384R1())))
}
TAGS = [0x00, 0x02, 0x03, 0x04, 0x05, 0x06, 0x0C, 0x13, 0x1E, 0x30, 0x31, 0x80, 0xA0, 0xFF]
LENGTHS = [0x00, 0x7F, 0x80, 0x81, 0x82, 0x84, 0xFF]


def _mutate(draw, data: bytearray, version_at: int) -> None:
    at = draw(st.integers(0, max(len(data) - 1, 0)))
    kind = draw(st.sampled_from(["flip", "truncate", "tag", "version", "insert", "remove", "length"]))
    if kind == "insert":
        data[at:at] = draw(st.binary(min_size=1, max_size=4))
    elif kind in ("truncate", "remove"):
        del data[at : len(data) if kind == "truncate" else at + draw(st.integers(1, 4))]
    elif kind == "version" and version_at < len(data):
        data[version_at] = draw(st.integers(0, 255))
    elif data and kind == "flip":
        data[at] ^= 1 << draw(st.integers(0, 7))
    elif data and kind in ("tag", "length"):
        data[at] = draw(st.sampled_from(TAGS if kind == "tag" else LENGTHS))


@st.composite
def mutated(draw) -> tuple[bytes, bytes, bytes]:
    """(what is sent, the mutated DER inside it, the good DER it came from)"""
    original = GOOD[draw(st.sampled_from(sorted(GOOD)))]
    data = bytearray(original)
    version_at = original.index(bytes([INTEGER, 1, 0])) + 2  # the first INTEGER is the version
    for _ in range(draw(st.integers(1, 3))):
        _mutate(draw, data, version_at)
    der = bytes(data)
    wrapper = draw(st.sampled_from([lambda d: d, pem, base64.b64encode]))
    return wrapper(der), der, original


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(mutated())
def test_mutated_csrs_are_signed_by_their_key_or_refused(case):
    data, der, original = case
    try:
        request = check_device_csr(data, "dev-1")
    except CsrRejected as error:
        assert error.code and error.message and "\n" not in error.message
        return
    # Accepted: only what is outside the signed part can have changed, and the key is the one that signed it.
    decoded, _ = der_decoder.decode(original, asn1Spec=rfc2986.CertificationRequest())
    signed_part = der_encoder.encode(decoded["certificationRequestInfo"])
    assert signed_part in der
    public_key = der_encoder.encode(decoded["certificationRequestInfo"]["subjectPKInfo"])
    assert request.public_key_sha256 == hashlib.sha256(public_key).hexdigest()


@pytest.mark.parametrize(
    "wrap",
    [
        lambda pem: b"-----END CERTIFICATE REQUEST-----\n" + pem,  # a stray END line before the block
        lambda pem: pem + b"-----END CERTIFICATE REQUEST-----\nOK\n",  # and one after its own END line
    ],
    ids=["end-before", "end-after"],
)
def test_the_pem_block_ends_at_its_own_end_line(wrap):
    """The CSR block runs from its BEGIN line to the first END line after it, whatever else is around."""
    key = device_key()
    pem = make_csr("device-1", key)
    request = check_device_csr(wrap(pem), "device-1")
    assert request.public_key.public_numbers() == key.public_key().public_numbers()


@pytest.mark.parametrize("width", [64, 10_000])
def test_bare_base64_with_the_modem_ok_line(width):
    """Wrapped base64 DER followed by the modem's final `OK` line: the OK line is dropped, nothing else."""
    key = device_key()
    der = load_csr(make_csr("device-1", key)).public_bytes(serialization.Encoding.DER)
    text = base64.b64encode(der)
    body = b"\r\n".join(text[i : i + width] for i in range(0, len(text), width)) + b"\r\nOK\r\n"
    request = check_device_csr(body, "device-1")
    assert request.public_key.public_numbers() == key.public_key().public_numbers()


def test_a_csr_given_as_text_is_read_as_its_utf_8():
    """A CSR handed over as text (a JSON string) is read as UTF-8; what UTF-8 cannot hold (a lone surrogate)
    becomes '?', never an exception other than CsrRejected."""
    pem = make_csr("dev-1").decode()
    for text in (pem, pem + "\ud800", "\ud800" + pem):
        request = check_device_csr(text, "dev-1")
        assert isinstance(request, DeviceRequest) and request.device_id == "dev-1"


def test_a_key_of_a_kind_without_a_name_is_named_by_its_type():
    """An X25519 key (it cannot even sign) is refused as unsupported-key, named by cryptography's type."""
    key = device_key()
    x25519_spki = (
        x25519.X25519PrivateKey.generate()
        .public_key()
        .public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    )
    with pytest.raises(CsrRejected) as refused:
        check_device_csr(plain(key, public_key=x25519_spki), "dev-1")
    assert refused.value.code == "unsupported-key" and "the CSR's key is X25519PublicKey;" in refused.value.message


@pytest.mark.parametrize(
    ("common_name", "organization", "noted"),
    [
        (b"dev-1", None, None),
        (b"dev-1", PRINTABLE_SET, None),  # every character PrintableString allows, and nothing else
        (b"dev_1", None, "the CSR's CN is a PrintableString holding '_', which it may not: read as ASCII"),
    ],
)
def test_a_printable_string_is_noted_only_when_it_holds_what_it_may_not(common_name, organization, noted):
    """In a CSR that must be re-encoded (here its signed part has a BER length), each PrintableString is
    checked against X.680's set: one note for a character outside it, none for a string inside it."""
    key = device_key()
    pairs = tlv(SET, tlv(SEQUENCE, oid("2.5.4.3") + tlv(PRINTABLE, common_name)))
    if organization:
        pairs += tlv(SET, tlv(SEQUENCE, oid("2.5.4.10") + tlv(PRINTABLE, organization)))
    csr = signed(key, request_info(key, subject=tlv(SEQUENCE, pairs), length_octets=2))
    request = check_device_csr(csr, common_name.decode())
    ber = "the CSR's signed part was BER, not DER (X.690 §10): the signature was checked over it as sent"
    assert request.notes == ((noted,) if noted else ()) + (ber,)
