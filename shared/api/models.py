"""Request and response bodies, for validation and for the OpenAPI document. JSON names as in the contract."""

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..pki.revocation import REVOCATION_REASONS


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
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
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
    curve: Literal["P-256", "P-384"] | None = None
    days: float | None = Field(None, gt=0, le=36500)


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
    warnings: list[str] | None = None


class ProofRequest(Strict):
    verificationCode: str = Field(description="the code DPS shows for the root certificate")


class ProofResponse(BaseModel):
    verificationCode: str
    certificate: str = Field(description="CN = the code, signed by the root key")
    dps: dict[str, Any]


class IssuedCertificateView(BaseModel):
    serialNumber: str
    deviceId: str
    intermediateId: str
    status: Literal["active", "superseded", "revoked"]
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
        description="the other certificates that held the same key, revoked in the same commit"
    )
    dps: dict[str, Any]


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


class Health(BaseModel):
    status: Literal["ok"]
    backends: dict[str, str] = Field(description="keys, ledger and dps backends in use")
    dpsConfigured: bool
    auth: Literal["apikey", "easyauth"]
