"""Request and response bodies, for validation and for the OpenAPI document. JSON names as in the contract."""

from collections.abc import Callable
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from .. import parameters
from ..pki.names import MAX_REGISTRATION_ID
from ..pki.revocation import REVOCATION_REASONS


class RuleBroken(ValueError):
    """A rule of shared/parameters.py broken, as pydantic carries it (in an error's ctx["error"]): its words,
    and its code, which the 400 keeps when it is the only error (shared/api/errors.py)."""

    def __init__(self, problem: str, code: str) -> None:
        super().__init__(problem)
        self.code = code


def _rule(rule: Callable[[Any], Any]) -> BeforeValidator:
    """A rule of shared/parameters.py as a pydantic validator: its words become the 400's message."""

    def check(value: Any) -> Any:
        try:
            return rule(value)
        except parameters.InvalidParameter as error:
            raise RuleBroken(error.problem, error.code) from None

    return BeforeValidator(check)


# The parameters' rules, as types FastAPI validates with (and documents, with their bounds). The bounds come
# before the rule: after it, pydantic publishes them as "ge"/"le" keys, which no OpenAPI tool reads.
Days = Annotated[float, Field(gt=0, le=parameters.MAX_DAYS), _rule(parameters.days)]
PageLimit = Annotated[int, Field(ge=1, le=parameters.MAX_PAGE), _rule(parameters.page_limit)]
Cursor = Annotated[str, Field(pattern=parameters.CURSOR_PATTERN), _rule(parameters.cursor)]
Status = Annotated[Literal["active", "superseded", "revoked", "expired"], _rule(parameters.status)]
Curve = Literal["P-256", "P-384"]
DeviceId = Annotated[str, Field(min_length=1, max_length=MAX_REGISTRATION_ID), _rule(parameters.device_id)]
CaId = Annotated[str, Field(min_length=1, max_length=parameters.MAX_CA_ID), _rule(parameters.ca_id)]
Requester = Annotated[str, Field(min_length=1, max_length=parameters.MAX_REQUESTER), _rule(parameters.requester)]


class Strict(BaseModel):
    """A request body: no unknown fields, and every string valid Unicode. JSON may escape a lone UTF-16
    surrogate ("\\ud800"), which no store or certificate can hold: it is a 400 here, not a 500 later."""

    model_config = ConfigDict(extra="forbid")

    @model_validator(mode="after")
    def _valid_unicode(self) -> "Strict":
        for name, value in self:
            if not _encodable(value):
                raise ValueError(f"{name} is not valid Unicode (it holds a lone surrogate)")
        return self


def _encodable(value: Any) -> bool:
    if isinstance(value, str):
        return parameters.unicode_text(value)
    if isinstance(value, list | tuple):
        return all(map(_encodable, value))
    if isinstance(value, dict):
        return all(_encodable(k) and _encodable(v) for k, v in value.items())
    return True


class ErrorDetail(BaseModel):
    code: str = Field(description="stable, machine-readable", examples=["cn-mismatch"])
    message: str = Field(description="one line for a person")


class ErrorResponse(BaseModel):
    error: ErrorDetail


class CsrRequest(Strict):
    csr: str = Field(description="PKCS#10 request, PEM", examples=["-----BEGIN CERTIFICATE REQUEST-----\n..."])
    renew: bool = Field(False, description="replace the device's active certificate")
    intermediateId: str | None = Field(None, description="sign with this intermediate (default: your newest)")


class DpsRegistration(BaseModel):
    globalEndpoint: str
    idScope: str
    registrationId: str


class DeviceBundle(BaseModel):
    deviceId: str
    serialNumber: str
    notBefore: str
    notAfter: str
    certificate: str = Field(description="the device certificate, PEM")
    certificateChain: str = Field(description="device then intermediate, PEM")
    intermediateId: str
    dps: DpsRegistration | None = Field(None, description="present when DPS is configured")
    warnings: list[str] | None = Field(None, description="present when something was adjusted")


class CreateCa(Strict):
    commonName: str | None = Field(None, max_length=64)
    organization: str | None = Field(None, max_length=64)
    curve: Curve | None = None
    days: Days | None = None


class CreateIntermediate(CreateCa):
    id: str | None = Field(None, description="lowercase letters, digits and '-'; default int-DATE-RANDOM")


class CaCertificate(BaseModel):
    id: str
    kind: Literal["root", "intermediate"]
    commonName: str
    curve: str
    serialNumber: str
    notBefore: str
    notAfter: str
    status: Literal["active", "disabled"]
    keyBackend: str
    keyName: str
    certificate: str
    dps: dict[str, Any]
    default: bool | None = Field(None, description="an intermediate: whether it signs when none is named")
    warnings: list[str] | None = None


class PublicCaCertificate(BaseModel):
    id: str
    kind: Literal["root", "intermediate"]
    commonName: str
    serialNumber: str
    notBefore: str
    notAfter: str
    status: Literal["active", "disabled"]
    certificate: str = Field(description="PEM")


class CaChain(BaseModel):
    root: PublicCaCertificate
    intermediates: list[PublicCaCertificate] = Field(description="the caller's (an admin: all), oldest first")


class ProofRequest(Strict):
    verificationCode: str | None = Field(
        None, description="the code DPS shows for the root (required offline; with DPS configured, asked of DPS)"
    )
    verifiedOnUpload: bool = Field(False, description="upload the root marked verified instead (needs DPS)")


class ProofResponse(BaseModel):
    verificationCode: str | None
    certificate: str | None = Field(description="CN = the code, signed by the root key (None: nothing signed)")
    alreadyVerified: bool = Field(False, description="DPS held the root verified already; nothing was changed")
    dps: dict[str, Any]
    warnings: list[str] | None = Field(None, description="while DPS is offline: that nothing was sent")


class IssuedCertificateView(BaseModel):
    serialNumber: str
    deviceId: str
    intermediateId: str
    status: Literal["active", "superseded", "revoked", "expired"]
    notBefore: str
    notAfter: str
    requestedBy: str
    publicKeySha256: str
    createdAt: str
    statusChangedAt: str | None
    statusReason: str | None
    certificate: str


class CertificateList(BaseModel):
    items: list[IssuedCertificateView]
    nextCursor: str | None = Field(description="pass as `cursor` for the next page")


class RevokeRequest(Strict):
    reason: str = Field(
        "unspecified",
        max_length=40,
        description=f"an RFC 5280 §5.3.1 reason, any case: {', '.join(REVOCATION_REASONS)}",
        examples=["keyCompromise"],
    )


class RevokeResponse(IssuedCertificateView):
    alsoRevoked: list[IssuedCertificateView] = Field(
        description="the other certificates that held the same key, revoked in the same commit (for a "
        "certificate revoked before: those its first revocation revoked with it)"
    )
    dps: dict[str, Any]
    warnings: list[str] | None = Field(None, description="while DPS is offline: that nothing was sent")


class CreateFactory(Strict):
    name: str = Field(description="the factory's ID: lowercase letters, digits and '-'")
    intermediates: list[str] = Field(min_length=1, description="the intermediates it may sign with")
    appId: str | None = Field(None, description="its Entra application ID, for PKI_AUTH=easyauth")


class FactoryIntermediates(Strict):
    intermediates: list[str] = Field(min_length=1, description="the intermediates it may sign with, from now on")


class PrincipalView(BaseModel):
    id: str
    role: Literal["admin", "factory"]
    intermediates: list[str]
    appId: str | None
    createdAt: str


class NewKey(BaseModel):
    principal: PrincipalView
    keyId: str
    apiKey: str = Field(description="shown once; only its hash is stored")


class ApiKeyView(BaseModel):
    id: str
    principalId: str
    createdAt: str
    revokedAt: str | None


class HealthProblem(BaseModel):
    part: Literal["keys", "ledger"]
    code: str = Field(description="the error's code, e.g. key-passphrase-wrong or ledger-unavailable")
    errorId: str | None = Field(description="the log has the details under this ID")


class Health(BaseModel):
    status: Literal["ok", "degraded"]
    backends: dict[str, str] | None = Field(None, description="authenticated callers: keys, ledger and dps backends")
    dpsConfigured: bool | None = Field(None, description="authenticated callers")
    auth: Literal["apikey", "easyauth"] | None = Field(None, description="authenticated callers")
    problems: list[HealthProblem] | None = Field(None, description="authenticated callers, when degraded")


# -- batches -------------------------------------------------------------------------------------------


class BatchItemIn(BaseModel):
    deviceId: str = Field(description="= the CSR's CN = the DPS registration ID")
    csr: str = Field(description="PKCS#10 request, PEM")


class BatchRequest(BaseModel):
    items: list[BatchItemIn] = Field(description="1 to 10,000 items; a bad item fails alone", max_length=10_000)
    intermediateId: str | None = Field(None, description="sign with this intermediate (default: your newest)")


class BatchCounts(BaseModel):
    total: int
    pending: int
    issued: int
    failed: int


class Batch(BaseModel):
    id: str
    status: Literal["queued", "running", "done", "done-with-failures"]
    requestedBy: str
    intermediateId: str
    counts: BatchCounts
    createdAt: str
    startedAt: str | None = Field(description="when its first chunk began signing")
    finishedAt: str | None = Field(description="when its last item got its result")


class BatchItemResult(BaseModel):
    index: int = Field(description="the item's place in the request, from 0")
    deviceId: str
    status: Literal["pending", "issued", "failed"]
    created: bool | None = Field(None, description="issued: false when the same CSR's certificate was given back")
    bundle: DeviceBundle | None = None
    error: ErrorDetail | None = None


class BatchWithResults(Batch):
    results: list[BatchItemResult]
    nextCursor: str | None = Field(description="pass as `cursor` for the next page of results")


class BatchList(BaseModel):
    items: list[Batch]
    nextCursor: str | None = Field(description="pass as `cursor` for the next page")
