"""CSRs as devices and tools really send them: the text around them, BER, and the encoding slips openssl accepts.

`csr.py` reads a clean PEM or DER CSR with `cryptography` alone. Only when that fails does it come here:

- `unwrap_csr(data)` finds the DER of the one CSR in what carried it: PEM after other text (`openssl req -text`),
  the "NEW CERTIFICATE REQUEST" label (Windows certreq, Java keytool, GnuTLS certtool), a byte-order mark (UTF-8,
  or UTF-16 from PowerShell), CRLF, bare base64 or base64url, and an nRF91 modem's `%KEYGEN` answer;
- `normalise_csr(der)` decodes the PKCS#10 structure tolerantly (BER, with pyasn1 and pyasn1-modules' RFC 2986
  definitions) and re-encodes a clean DER CSR for `cryptography` to read the key and subject from. It keeps the
  CertificationRequestInfo exactly as sent: the signature covers those bytes, so it must be checked over them.

What is accepted is what cannot change what was signed: the outer encoding, and inside the signed part only what
leaves the key and names unambiguous. Rule sources: RFC 2986 §4 (PKCS#10), RFC 5480 §2.1.1 (named curves only)
and §2.2 (point forms), RFC 5758 §3.2 (ECDSA AlgorithmIdentifier parameters MUST be absent), X.690 §10 (DER),
RFC 7468 §5.1 and §7 (PEM, legacy labels). Pure: no I/O. Everything wrong with the input is a CsrRejected.
"""

import base64
import binascii
import re
from dataclasses import dataclass

from pyasn1.codec.ber import decoder as ber_decoder
from pyasn1.codec.der import encoder as der_encoder
from pyasn1.error import PyAsn1UnicodeDecodeError
from pyasn1.type import char, univ
from pyasn1_modules import rfc2986, rfc5280, rfc5480

from .errors import CsrRejected

# What the tolerant reader decodes at most: pyasn1 takes about half a millisecond per subject attribute, and a
# device CSR is a few hundred bytes (the HTTP API takes 8 KiB bodies). A larger clean CSR is read by cryptography.
MAX_TOLERANT_SIZE = 8 * 1024
_UTF8_BOM = b"\xef\xbb\xbf"
_UTF16_BOMS = (b"\xff\xfe", b"\xfe\xff")
_SEQUENCE_TAG = b"\x30"
_END_OF_CONTENTS = b"\x00\x00"
_PADDING = b" \t\r\n\x00"  # what editors and fixed-size buffers leave after a DER CSR
_PEM_BEGIN = re.compile(rb"-----BEGIN ([A-Z0-9 ]{1,40})-----")
_CSR_LABELS = (b"CERTIFICATE REQUEST", b"NEW CERTIFICATE REQUEST")  # RFC 7468 §7: the second is legacy
_KEYGEN_ANSWER = re.compile(rb'%KEYGEN:\s*"([^"]*)"')
_BASE64_TEXT = re.compile(rb"[A-Za-z0-9+/_-]+=*")
_BASE64URL_TO_STANDARD = bytes.maketrans(b"-_", b"+/")

_ECDSA_SIGNATURES = {
    rfc5480.ecdsa_with_SHA1,
    rfc5480.ecdsa_with_SHA224,
    rfc5480.ecdsa_with_SHA256,
    rfc5480.ecdsa_with_SHA384,
    rfc5480.ecdsa_with_SHA512,
}
_ATTRIBUTES = rfc2986.CertificationRequestInfo.componentType.getTypeByPosition(3)
_COMMON_NAME = rfc5280.id_at_commonName
_SHORT_NAMES = {
    "2.5.4.3": "CN",
    "2.5.4.5": "serialNumber",
    "2.5.4.6": "C",
    "2.5.4.7": "L",
    "2.5.4.8": "ST",
    "2.5.4.10": "O",
    "2.5.4.11": "OU",
    "1.2.840.113549.1.9.1": "emailAddress",
    "0.9.2342.19200300.100.1.25": "DC",
}
# X.520 string types, each decoded the way openssl reads it (T61String as Latin-1)
_STRING_TYPES = (
    char.UTF8String,
    char.PrintableString,
    char.IA5String,
    char.BMPString,
    char.UniversalString,
    char.TeletexString,
    char.VisibleString,
    char.NumericString,
)
_CHARSET_NAMES = {"utf-8": "UTF-8", "utf-16-be": "UTF-16", "utf-32-be": "UTF-32", "us-ascii": "ASCII"}
_PRINTABLE = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789 '()+,-./:=?")


@dataclass(frozen=True)
class NormalisedCsr:
    """A CSR read tolerantly.

    `der` is a clean DER CertificationRequest for `cryptography`: version 0, the subject's strings as UTF8String,
    the SubjectPublicKeyInfo as sent (in DER), an empty attributes set (the CA never reads attributes), the
    signature algorithm without parameters and the signature as sent. Its signature need not verify over its own
    CertificationRequestInfo: check `signature` over `signed_bytes`, the CertificationRequestInfo exactly as sent.
    `notes` has one sentence per normalisation applied, for the caller to show as warnings.
    """

    der: bytes
    signed_bytes: bytes
    signature: bytes
    notes: tuple[str, ...] = ()


def unwrap_csr(data: bytes) -> tuple[bytes, tuple[str, ...]]:
    """The DER of the one CSR in `data` and a note for each thing set aside beside it.

    Accepts DER; PEM ("CERTIFICATE REQUEST" or "NEW CERTIFICATE REQUEST") anywhere in text, CRLF or LF; bare
    base64 or base64url; an nRF91 `%KEYGEN: "<csr>.<attestation>"` answer with or without its wrapper and final
    OK line (the attestation is not verified); any of these after a UTF-8 or UTF-16 byte-order mark.
    Raises CsrRejected: empty-csr, not-a-csr (also for a PEM block of another kind, named, never echoed),
    private-key-in-body, multiple-csrs, truncated-csr (no END line), malformed-csr (a PEM body that is not base64).
    """
    data = _without_byte_order_mark(data)
    if not data.strip():
        raise CsrRejected("empty-csr", "the CSR is empty")
    if data.startswith(_SEQUENCE_TAG):
        return data, ()
    if b"-----BEGIN" in data:
        if b"%KEYGEN:" in data:
            raise CsrRejected(
                "multiple-csrs", "the body holds a PEM CSR and a %KEYGEN answer; send one CSR per request"
            )
        return _from_pem(data)
    if b"%KEYGEN:" in data:
        return _from_keygen_answer(data)
    return _from_base64(data)


def normalise_csr(der: bytes) -> NormalisedCsr:
    """Decode the PKCS#10 request at the start of `der` tolerantly (RFC 2986 §4) and re-encode it cleanly.

    Normalised, each with a note: BER anywhere (long-form or indefinite lengths), bytes after the CSR, explicit
    NULL parameters in an ECDSA signature algorithm (RFC 5758 §3.2), version 1, a missing attributes field, a
    compressed EC point (RFC 5480 §2.2), a PrintableString holding characters outside its set. The signature is
    not checked here: the caller checks `signature` over `signed_bytes` with the key in `der`.
    Raises CsrRejected: csr-too-large (over MAX_TOLERANT_SIZE), not-a-csr (not a signed request at all, or an
    X.509 certificate), truncated-csr, malformed-csr (naming the field), invalid-csr-version, invalid-cn /
    invalid-subject (a string not valid for its type, a CN that is no string), unsupported-curve (explicit or
    absent curve parameters, RFC 5480 §2.1.1), invalid-public-key (a point form RFC 5480 §2.2 rejects),
    invalid-signature-algorithm (ECDSA parameters other than NULL).
    """
    if len(der) > MAX_TOLERANT_SIZE:
        raise CsrRejected(
            "csr-too-large",
            f"the CSR is {len(der)} bytes and not plain DER; a device CSR is well under {MAX_TOLERANT_SIZE} bytes",
        )
    (signed, algorithm_raw, signature_raw), trailing = _signed_request_parts(der)
    algorithm, notes = _signature_algorithm(algorithm_raw)
    signature = _signature_value(signature_raw)
    request_info, info_notes = _request_info(signed)
    outer = der[: len(der) - len(trailing)]
    if not _is_der(outer, _any_sequence([signed, algorithm_raw, signature_raw])) or not (
        _is_der(algorithm_raw, _decode(algorithm_raw, rfc2986.AlgorithmIdentifier(), "signatureAlgorithm"))
        and _is_der(signature_raw, _decode(signature_raw, univ.BitString(), "signature"))
    ):
        notes.append("the CSR's outer SEQUENCE was BER, not DER (X.690 §10): re-encoded")
    if trailing:
        count = f"{len(trailing)} bytes" if len(trailing) > 1 else "1 byte"
        if trailing.strip(_PADDING):
            # only padding may follow: anything else could be a second request, and nothing legitimate writes it
            raise CsrRejected("trailing-data", f"{count} after the end of the CSR that are not padding: send one CSR")
        notes.append(f"{count} of padding after the end of the CSR: ignored")
    request = rfc2986.CertificationRequest()
    request["certificationRequestInfo"] = request_info
    request["signatureAlgorithm"] = algorithm
    request["signature"] = univ.BitString.fromOctetString(signature)
    return NormalisedCsr(der_encoder.encode(request), signed, signature, (*info_notes, *notes))


# ---- text forms -------------------------------------------------------------------------------------------------


def _without_byte_order_mark(data: bytes) -> bytes:
    if data.startswith(_UTF8_BOM):
        return data[len(_UTF8_BOM) :]
    if data.startswith(_UTF16_BOMS):  # PowerShell 5's redirection writes UTF-16; DER never starts so
        try:
            return data.decode("utf-16").encode("utf-8")
        except UnicodeDecodeError:
            raise _not_a_csr() from None
    return data


def _from_pem(data: bytes) -> tuple[bytes, tuple[str, ...]]:
    blocks = list(_PEM_BEGIN.finditer(data))
    labels = [block.group(1).decode("ascii") for block in blocks]
    if any("PRIVATE KEY" in label for label in labels):
        raise CsrRejected(
            "private-key-in-body",
            "the body holds a PEM PRIVATE KEY: send only the CSR (a device's key never leaves it)",
        )
    requests = [block for block in blocks if block.group(1) in _CSR_LABELS]
    if not requests:
        raise (
            CsrRejected("not-a-csr", f"expected a PEM CERTIFICATE REQUEST, got {labels[0]}") if labels else _not_a_csr()
        )
    if len(requests) > 1:
        raise CsrRejected(
            "multiple-csrs", f"the body holds {len(requests)} PEM CERTIFICATE REQUEST blocks; send one CSR per request"
        )
    begin = requests[0]
    label = begin.group(1)
    end = data.find(b"-----END " + label + b"-----", begin.end())
    if end < 0:
        raise CsrRejected("truncated-csr", f"the PEM {label.decode()} block has no END line: the CSR is cut short")
    der = _base64_decode(data[begin.end() : end])
    if der is None:
        raise CsrRejected("malformed-csr", f"the PEM {label.decode()} block is not valid base64")
    others = dict.fromkeys(label for label in labels if label.encode() not in _CSR_LABELS)
    return der, tuple(f"a PEM {label} block beside the CSR was ignored" for label in others)


def _from_keygen_answer(data: bytes) -> tuple[bytes, tuple[str, ...]]:
    """An nRF91 modem's `%KEYGEN: "<base64url CSR>.<base64url COSE_Sign1>"` line, as `AT%KEYGEN` prints it."""
    answers = _KEYGEN_ANSWER.findall(data)
    if len(answers) > 1:
        raise CsrRejected("multiple-csrs", f"the body holds {len(answers)} %KEYGEN answers; send one CSR per request")
    if not answers:
        raise _not_a_csr()
    return _from_base64(answers[0])


def _from_base64(text: bytes) -> tuple[bytes, tuple[str, ...]]:
    """Bare base64 or base64url DER, possibly `<csr>.<attestation>` and the modem's final OK line."""
    lines = text.split()
    if len(lines) > 1 and lines[-1] == b"OK":
        lines = lines[:-1]
    request, _, attestation = b"".join(lines).partition(b".")
    der = _base64_decode(request)
    if der is None or not der.startswith(_SEQUENCE_TAG):
        raise _not_a_csr()
    if attestation:
        return der, ("the nRF91 attestation token after the CSR was ignored: it is not verified",)
    return der, ()


def _base64_decode(text: bytes) -> bytes | None:
    """Standard or URL-safe base64, padded or not, across lines; None when it is not base64."""
    compact = b"".join(text.split())
    if not _BASE64_TEXT.fullmatch(compact):
        return None
    compact = compact.rstrip(b"=").translate(_BASE64URL_TO_STANDARD)
    try:
        return base64.b64decode(compact + b"=" * (-len(compact) % 4), validate=True)
    except binascii.Error:
        return None


def _not_a_csr() -> CsrRejected:
    return CsrRejected("not-a-csr", "the body is not a PKCS#10 certificate signing request (PEM, DER or base64)")


# ---- the signed request -----------------------------------------------------------------------------------------


def _signed_request_parts(der: bytes) -> tuple[list[bytes], bytes]:
    """CertificationRequest ::= SEQUENCE { certificationRequestInfo, signatureAlgorithm, signature }: the three
    parts exactly as sent, and whatever followed the SEQUENCE."""
    try:
        parts, trailing = _components(der, univ.Sequence(), "outer SEQUENCE")
    except CsrRejected as error:
        if error.code == "truncated-csr" and _begins_like_a_request(der):
            raise
        raise _not_a_csr() from None
    if len(parts) != 3:
        raise _not_a_csr()
    if _decodes(parts[0], rfc5280.TBSCertificate()):
        raise CsrRejected("not-a-csr", "the body is an X.509 certificate, not a certificate signing request")
    return parts, trailing


def _begins_like_a_request(der: bytes) -> bool:
    """Whether `der`, cut short, begins as a CSR does: a SEQUENCE in a SEQUENCE, opening with an INTEGER."""
    try:
        outer_start, _ = _contents_position(der, univ.Sequence(), "outer SEQUENCE")
        start, _ = _contents_position(der[outer_start:], univ.Sequence(), "certificationRequestInfo")
        _decode_prefix(der[outer_start + start :], univ.Integer(), "version")
    except CsrRejected:
        return False
    return True


def _signature_algorithm(raw: bytes) -> tuple[rfc5280.AlgorithmIdentifier, list[str]]:
    """The signature algorithm without ECDSA parameters; RFC 5758 §3.2 says they MUST be absent, and a NULL
    there (as nRF91 modems write) is the one form tolerated."""
    algorithm = _decode(raw, rfc2986.AlgorithmIdentifier(), "signatureAlgorithm")
    oid = algorithm["algorithm"]
    parameters = algorithm["parameters"]
    if oid not in _ECDSA_SIGNATURES or not parameters.isValue:
        return algorithm, []
    if not _decodes(parameters.asOctets(), univ.Null()):
        raise CsrRejected(
            "invalid-signature-algorithm",
            "the CSR's signatureAlgorithm carries ECDSA parameters; RFC 5758 §3.2 says they MUST be absent",
        )
    clean = rfc2986.AlgorithmIdentifier()
    clean["algorithm"] = oid
    return clean, ["the CSR's signature algorithm carried explicit NULL parameters (RFC 5758 §3.2): ignored"]


def _signature_value(raw: bytes) -> bytes:
    """The signature's octets. A BIT STRING declaring unused bits is read as whole, zero-padded octets, as
    cryptography's own reader does: if those bits were not zero, the octets are not what was sent and the
    signature fails to verify."""
    return _decode(raw, univ.BitString(), "signature").asOctets()


def _request_info(signed: bytes) -> tuple[rfc2986.CertificationRequestInfo, list[str]]:
    """CertificationRequestInfo ::= SEQUENCE { version, subject, subjectPKInfo, attributes [0] } (RFC 2986 §4.1),
    re-encoded as version 0 with no attributes, and the notes on what was normalised."""
    fields, _ = _components(signed, univ.Sequence(), "certificationRequestInfo")
    if len(fields) not in (3, 4):
        raise CsrRejected(
            "malformed-csr",
            f"the CSR's certificationRequestInfo has {len(fields)} fields; RFC 2986 §4.1 has version, subject, "
            "subjectPKInfo and attributes",
        )
    version, notes = _version(fields[0])
    subject, subject_notes, values_are_der = _subject(fields[1])
    public_key_info, key_notes = _public_key_info(fields[2])
    as_decoded = [version, _decode(fields[1], rfc2986.Name(), "subject"), public_key_info]
    if len(fields) == 4:
        as_decoded.append(_decode(fields[3], _ATTRIBUTES.clone(), "attributes"))
    else:
        notes.append("the CSR had no attributes field (RFC 2986 §4.1 requires it, if empty): read as empty")
    notes += subject_notes + key_notes
    if not (values_are_der and _is_der(signed, _any_sequence(fields)) and all(map(_is_der, fields, as_decoded))):
        notes.append("the CSR's signed part was BER, not DER (X.690 §10): the signature was checked over it as sent")
    clean = rfc2986.CertificationRequestInfo()
    clean["version"] = 0
    clean["subject"] = subject
    clean["subjectPKInfo"] = public_key_info
    clean["attributes"] = _ATTRIBUTES.clone().clear()
    return clean, notes


def _version(raw: bytes) -> tuple[univ.Integer, list[str]]:
    version = _decode(raw, univ.Integer(), "version")
    if int(version) == 1:
        return version, ["the CSR's version field was 1, but RFC 2986 §4.1 defines only 0: read as 0"]
    if int(version) != 0:
        shown = int(version) if int(version).bit_length() <= 32 else "a number too large to show"
        raise CsrRejected(
            "invalid-csr-version", f"the CSR's version is {shown}; RFC 2986 §4.1 defines only version 0 (v1)"
        )
    return version, []


def _public_key_info(raw: bytes) -> tuple[rfc5280.SubjectPublicKeyInfo, list[str]]:
    """The SubjectPublicKeyInfo as sent; an EC key must name its curve (RFC 5480 §2.1.1) and be an uncompressed
    or compressed point (§2.2). Other key types pass: the key policy names them."""
    info = _decode(raw, rfc2986.SubjectPublicKeyInfo(), "subjectPKInfo")
    if info["algorithm"]["algorithm"] != rfc5480.id_ecPublicKey:
        return info, []
    _check_named_curve(info["algorithm"]["parameters"])
    return info, _point_notes(info["subjectPublicKey"])


def _check_named_curve(parameters: univ.Any) -> None:
    if parameters.isValue and _decodes(parameters.asOctets(), univ.ObjectIdentifier()):
        return
    if parameters.isValue and _decodes(parameters.asOctets(), univ.Sequence()):
        raise CsrRejected(
            "unsupported-curve",
            "the CSR's EC key gives explicit curve parameters (specifiedCurve); RFC 5480 §2.1.1 allows only a "
            "named curve: use P-256 or P-384",
        )
    raise CsrRejected(
        "unsupported-curve", "the CSR's EC key names no curve; RFC 5480 §2.1.1 requires one: P-256 or P-384"
    )


def _point_notes(bits: univ.BitString) -> list[str]:
    point = bits.asOctets() if len(bits) % 8 == 0 else b""
    if point[:1] == b"\x04":
        return []
    if point[:1] in (b"\x02", b"\x03"):
        return ["the CSR's public key was a compressed point (RFC 5480 §2.2): the certificate carries it uncompressed"]
    form = f"starts with 0x{point[0]:02x}" if point else "is not whole octets"
    raise CsrRejected(
        "invalid-public-key",
        f"the CSR's EC public key {form}; RFC 5480 §2.2 allows only 0x04 (uncompressed) or 0x02/0x03 (compressed)",
    )


# ---- the subject ------------------------------------------------------------------------------------------------


def _subject(raw: bytes) -> tuple[rfc2986.Name, list[str], bool]:
    """The subject with every value, a string, re-encoded as UTF8String, each read as its own type says (openssl
    reads T61String as Latin-1); the notes; whether every string was in DER."""
    notes: list[str] = []
    values_are_der = True
    sequence = rfc5280.RDNSequence()
    for rdn_raw in _components(raw, univ.Sequence(), "subject")[0]:
        rdn = rfc5280.RelativeDistinguishedName()
        for pair_raw in _components(rdn_raw, univ.Set(), "subject")[0]:
            pair, value_is_der = _attribute(pair_raw, notes)
            rdn.append(pair)
            values_are_der = values_are_der and value_is_der
        if not len(rdn):  # pyasn1 decodes an empty SET but will not re-encode it
            raise CsrRejected(
                "invalid-subject",
                "the CSR's subject has an empty RDN; RFC 5280 §4.1.2.4 requires one attribute or more",
            )
        sequence.append(rdn)
    name = rfc2986.Name()
    name["rdnSequence"] = sequence
    return name, notes, values_are_der


def _attribute(raw: bytes, notes: list[str]) -> tuple[rfc5280.AttributeTypeAndValue, bool]:
    """One AttributeTypeAndValue with its string as UTF8String, and whether that string was in DER."""
    parts, _ = _components(raw, univ.Sequence(), "subject")
    if len(parts) != 2:
        raise CsrRejected("invalid-subject", "the CSR's subject has an attribute that is not a type and a value")
    oid = _decode(parts[0], univ.ObjectIdentifier(), "subject")
    field, code = _field_name(oid)
    string = _string(parts[1], field, code)
    if string is None:
        raise CsrRejected(code, f"the CSR's {field} is not a string")
    kind, text = string
    if kind is char.PrintableString and not set(text) <= _PRINTABLE:
        outside = "".join(sorted(set(text) - _PRINTABLE))
        notes.append(f"the CSR's {field} is a PrintableString holding {outside!r}, which it may not: read as ASCII")
    pair = rfc5280.AttributeTypeAndValue()
    pair["type"] = oid
    pair["value"] = der_encoder.encode(char.UTF8String(text))
    return pair, der_encoder.encode(kind(text)) == parts[1]


def _field_name(oid: univ.ObjectIdentifier) -> tuple[str, str]:
    """How messages name a subject attribute, and the error code for it."""
    if oid == _COMMON_NAME:
        return "CN", "invalid-cn"
    dotted = str(oid)
    return f"subject attribute {_SHORT_NAMES.get(dotted, dotted)}", "invalid-subject"


def _string(raw: bytes, field: str, code: str) -> tuple[type, str] | None:
    """(string type, text) of an X.520 string value, None when `raw` is not one; CsrRejected when its octets are
    not valid for its type (invalid UTF-8 in a UTF8String, an odd-length BMPString, ...)."""
    for kind in _STRING_TYPES:
        try:
            value, _ = ber_decoder.decode(raw, asn1Spec=kind())
        except PyAsn1UnicodeDecodeError:
            charset = _CHARSET_NAMES.get(kind.encoding, kind.encoding)
            raise CsrRejected(code, f"the CSR's {field} is not valid {charset} ({kind.__name__})") from None
        except Exception:  # noqa: S112 - any other failure means "not this type"; pyasn1 raises more than PyAsn1Error
            continue
        return kind, str(value)
    return None


# ---- pyasn1 helpers ---------------------------------------------------------------------------------------------


def _components(encoding: bytes, spec: univ.Sequence | univ.Set, field: str) -> tuple[list[bytes], bytes]:
    """The components of the constructed value at the start of `encoding`, each exactly as encoded, and the bytes
    after that value. Spans are measured from what the decoder leaves over: pyasn1's Any drops the
    end-of-contents octets of indefinite-length values, so its bytes cannot stand for what was signed."""
    start, length = _contents_position(encoding, spec, field)
    indefinite = length < 0
    end = len(encoding) if indefinite else start + length
    if end > len(encoding):
        raise CsrRejected(
            "truncated-csr",
            f"the CSR is cut short: its {field} declares {length} bytes, {len(encoding) - start} follow",
        )
    rest = encoding[start:end]
    parts = []
    while rest:
        if indefinite and rest.startswith(_END_OF_CONTENTS):
            return parts, rest[len(_END_OF_CONTENTS) :]
        _, after = _decode_prefix(rest, univ.Any(), field)
        parts.append(rest[: len(rest) - len(after)])
        rest = after
    if indefinite:
        raise CsrRejected("truncated-csr", f"the CSR is cut short: its {field} has no end-of-contents octets")
    return parts, encoding[end:]


def _contents_position(encoding: bytes, spec: univ.Sequence | univ.Set, field: str) -> tuple[int, int]:
    """Where the contents of the value at the start of `encoding` begin, and their length (-1: indefinite)."""
    found: list[tuple[int, int]] = []

    def at_contents(asn1_object, substrate, length, options):
        found.append((substrate.tell(), length))
        yield asn1_object

    _decode_prefix(encoding, spec, field, substrateFun=at_contents)
    return found[0]


def _decode_prefix(encoding: bytes, spec, field: str, **options) -> tuple:
    """pyasn1's BER decoding of the value at the start of `encoding`: (value, the bytes after it). CsrRejected
    naming `field` when it fails for any reason: on hostile input pyasn1 raises more than PyAsn1Error."""
    try:
        return ber_decoder.decode(encoding, asn1Spec=spec, **options)
    except Exception:
        raise CsrRejected("malformed-csr", f"the CSR's {field} cannot be decoded (RFC 2986 §4)") from None


def _decode(encoding: bytes, spec, field: str):
    """The one value `encoding` holds (a span `_components` measured), decoded as `spec`."""
    return _decode_prefix(encoding, spec, field)[0]


def _decodes(encoding: bytes, spec) -> bool:
    try:
        _decode(encoding, spec, "value")
    except CsrRejected:
        return False
    return True


def _is_der(raw: bytes, value) -> bool:
    """Whether `raw` is the DER encoding of what it decoded to."""
    return der_encoder.encode(value) == raw


def _any_sequence(parts: list[bytes]) -> univ.SequenceOf:
    """A SEQUENCE of these encodings as they are: to check the enclosing header is DER."""
    sequence = univ.SequenceOf(componentType=univ.Any())
    sequence.extend(univ.Any(part) for part in parts)
    return sequence
