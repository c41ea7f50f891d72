"""How a batch item's result is kept in a store: one JSON text, the same on SQLite and Table Storage."""

import json
from datetime import UTC, datetime
from typing import Any

from .models import ITEM_FAILED, ITEM_ISSUED, BatchItem, CertificateRecord

_TIME_FIELDS = ("not_before", "not_after", "created_at", "status_changed_at")


def result_json(item: BatchItem) -> str | None:
    """The result of a finished item as JSON text (None for a pending one): the certificate record as the
    ledger committed it, whether this batch created it, and its warnings; or the error's code and words."""
    if item.status == ITEM_ISSUED:
        assert item.certificate is not None
        return json.dumps(
            {"certificate": _record_fields(item.certificate), "created": item.created, "warnings": list(item.warnings)}
        )
    if item.status == ITEM_FAILED:
        return json.dumps({"code": item.error_code, "message": item.error_message})
    return None


def with_result(item: BatchItem, text: str | None) -> BatchItem:
    """`item` (read without its result) with the result that `result_json` wrote."""
    if not text:
        return item
    document: dict[str, Any] = json.loads(text)
    if item.status == ITEM_ISSUED:
        return BatchItem(
            **{**_base(item), "certificate": _record(document["certificate"])},
            created=bool(document.get("created")),
            warnings=tuple(document.get("warnings", ())),
        )
    return BatchItem(**_base(item), error_code=document.get("code"), error_message=document.get("message"))


def stamp(moment: datetime | None) -> str | None:
    """UTC, whole seconds, ISO 8601 with Z (the ledgers' own format)."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ") if moment else None


def moment(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _base(item: BatchItem) -> dict[str, Any]:
    return {
        "batch_id": item.batch_id,
        "index": item.index,
        "device_id": item.device_id,
        "csr": item.csr,
        "status": item.status,
        "finished_at": item.finished_at,
    }


def _record_fields(record: CertificateRecord) -> dict[str, Any]:
    fields = dict(record.__dict__)
    for name in _TIME_FIELDS:
        fields[name] = stamp(fields[name])
    return fields


def _record(fields: dict[str, Any]) -> CertificateRecord:
    values = dict(fields)
    for name in _TIME_FIELDS:
        values[name] = moment(values.get(name))
    return CertificateRecord(**values)
