"""The JSON documents of the contract, built from ledger records: one shape for the CLI and the API."""

from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from .ledger.models import ApiKey, CaRecord, CertificateRecord, Principal, Revocation

if TYPE_CHECKING:  # the service's results use these views' formats (iso): no import at run time
    from .ledger.models import BatchSummary
    from .service.access import NewApiKey
    from .service.batches import BatchResult


def iso(moment: datetime | None) -> str | None:
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def ca_view(record: CaRecord, warnings: tuple[str, ...] = (), default: bool | None = None) -> dict[str, Any]:
    """A CA certificate for an admin; `default` (for an intermediate) says whether it signs when none is named."""
    document: dict[str, Any] = {
        "id": record.id,
        "kind": record.kind,
        "commonName": record.common_name,
        "curve": record.curve,
        "serialNumber": record.serial,
        "notBefore": iso(record.not_before),
        "notAfter": iso(record.not_after),
        "status": record.status,
        "keyBackend": record.key_backend,
        "keyName": record.key_name,
        "certificate": record.certificate_pem,
        "dps": record.dps,
    }
    if default is not None:
        document["default"] = default
    if warnings:
        document["warnings"] = list(warnings)
    return document


def intermediate_views(records: list[CaRecord], default_id: str | None) -> list[dict[str, Any]]:
    """Intermediates for an admin, each marked with whether it is the default (service.default_intermediate_id)."""
    return [ca_view(record, default=record.id == default_id) for record in records]


def ca_public_view(record: CaRecord) -> dict[str, Any]:
    """A CA certificate for anyone who verifies with it: no key names, no DPS records (which name paths)."""
    return {
        "id": record.id,
        "kind": record.kind,
        "commonName": record.common_name,
        "serialNumber": record.serial,
        "notBefore": iso(record.not_before),
        "notAfter": iso(record.not_after),
        "status": record.status,
        "certificate": record.certificate_pem,
    }


def certificate_view(record: CertificateRecord) -> dict[str, Any]:
    return {
        "serialNumber": record.serial,
        "deviceId": record.device_id,
        "intermediateId": record.intermediate_id,
        "status": record.status,
        "notBefore": iso(record.not_before),
        "notAfter": iso(record.not_after),
        "requestedBy": record.requested_by,
        "publicKeySha256": record.public_key_sha256,
        "createdAt": iso(record.created_at),
        "statusChangedAt": iso(record.status_changed_at),
        "statusReason": record.status_reason,
        "certificate": record.certificate_pem,
    }


def revocation_view(revocation: Revocation, dps: dict[str, Any]) -> dict[str, Any]:
    """A revoked certificate, the others revoked with its key, and what DPS was told (and, while DPS is
    offline, a warning that nothing was sent)."""
    document = {
        **certificate_view(revocation.record),
        "alsoRevoked": [certificate_view(record) for record in revocation.also_revoked],
        "dps": dps,
    }
    return {**document, "warnings": offline_warnings(dps)} if offline_warnings(dps) else document


def offline_warnings(dps: dict[str, Any]) -> list[str]:
    """The warning an answer carries when DPS is offline: what would have been sent was only recorded."""
    return [dps["message"]] if dps.get("mode") in ("offline", "failed") and dps.get("message") else []


def principal_view(principal: Principal) -> dict[str, Any]:
    return {
        "id": principal.id,
        "role": principal.role,
        "intermediates": list(principal.intermediates),
        "appId": principal.app_id,
        "createdAt": iso(principal.created_at),
    }


def api_key_view(key: ApiKey) -> dict[str, Any]:
    return {
        "id": key.id,
        "principalId": key.principal_id,
        "createdAt": iso(key.created_at),
        "revokedAt": iso(key.revoked_at),
    }


def new_api_key_view(issued: "NewApiKey") -> dict[str, Any]:
    """The one document that carries a key's secret; shown once."""
    return {"principal": principal_view(issued.principal), "keyId": issued.key.id, "apiKey": issued.secret}


# -- batches -------------------------------------------------------------------------------------------


def batch_view(summary: "BatchSummary") -> dict[str, Any]:
    """A batch's progress: status, counts and timing (UTC, ISO 8601; null until known)."""
    record = summary.record
    return {
        "id": record.id,
        "status": summary.status,
        "requestedBy": record.requested_by,
        "intermediateId": record.intermediate_id,
        "counts": {
            "total": record.total,
            "pending": summary.pending,
            "issued": summary.issued,
            "failed": summary.failed,
        },
        "createdAt": iso(record.created_at),
        "startedAt": iso(summary.started_at),
        "finishedAt": iso(summary.finished_at),
    }


def batch_result_view(result: "BatchResult") -> dict[str, Any]:
    """One item's result: `bundle` (the device bundle) when issued, `error` when failed, neither if pending."""
    document: dict[str, Any] = {"index": result.index, "deviceId": result.device_id, "status": result.status}
    if result.issued is not None:
        document["created"] = result.issued.created
        document["bundle"] = result.issued.bundle()
    if result.error is not None:
        document["error"] = {"code": result.error[0], "message": result.error[1]}
    return document
