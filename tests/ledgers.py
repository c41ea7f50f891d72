"""Looking at a ledger's store directly: everything it holds, and the rules checked on the raw tables."""

import json
from collections import defaultdict

from shared.ledger import Ledger
from shared.ledger.sqlite import SqliteLedger
from shared.ledger.tables import DEVICES, INDEX, KEYS, TABLES, TableLedger


def everything_stored(ledger: Ledger) -> bytes:
    """Every byte the ledger's store holds (the SQLite file; every entity of every table)."""
    if isinstance(ledger, SqliteLedger):
        return ledger.path.read_bytes()
    assert isinstance(ledger, TableLedger)
    rows = [dict(entity) for name in TABLES for entity in ledger.store.table(name).list_entities()]
    return json.dumps(rows, sort_keys=True, default=str).encode()


def table_rows(ledger: TableLedger, name: str) -> list[dict]:
    return [dict(entity) for entity in ledger.store.table(name).list_entities()]


def check_table_rules(ledger: TableLedger) -> dict[str, int]:
    """The ledger's rules, checked on the raw tables whatever state a crash left them in:
    - a device's certificates: at most one active, and it is the head's copy, field for field;
    - every certificate's key is bound to its device; a key revoked in a head has no active certificate;
    - every certificate can be found by its serial (index rows are written first), and serials are unique.
    Index rows and key bindings that point at no certificate are allowed (what a crash leaves).
    Returns counts of what was seen."""
    devices = table_rows(ledger, DEVICES)
    bindings = {row["PartitionKey"]: row for row in table_rows(ledger, KEYS)}
    index = table_rows(ledger, INDEX)
    serial_rows = {row["RowKey"]: row for row in index if row["PartitionKey"].startswith("ser-")}
    heads = {row["PartitionKey"]: row for row in devices if row["RowKey"] == "head"}
    certificates = [row for row in devices if row["RowKey"].startswith("c-")]
    active_by_device: dict[str, list[dict]] = defaultdict(list)
    serials: set[str] = set()
    for cert in certificates:
        assert cert["serial"] not in serials, f"serial {cert['serial']} twice"
        serials.add(cert["serial"])
        device = cert["PartitionKey"]
        assert device in heads, f"certificate {cert['serial']} without a device head"
        binding = bindings.get(cert["public_key_sha256"])
        assert binding is not None and binding["device_id"] == cert["device_id"], f"key of {cert['serial']} unbound"
        row = serial_rows.get(cert["serial"])
        assert row is not None and row["device_id"] == cert["device_id"] and row["cert_row"] == cert["RowKey"]
        if cert["status"] == "active":
            active_by_device[device].append(cert)
        if binding["revoked"]:
            assert cert["status"] != "active", f"active certificate {cert['serial']} of a revoked key"
    for device, head in heads.items():
        active = active_by_device.get(device, [])
        assert len(active) <= 1, f"device {device} has {len(active)} active certificates"
        copy = json.loads(head["active"]) if head["active"] else None
        if active:
            fields = {k: v for k, v in active[0].items() if k not in ("PartitionKey", "RowKey")}
            assert copy == fields, f"device {device}: the head's active certificate is not the active row"
        else:
            assert copy is None, f"device {device}: the head names an active certificate that is not active"
        for key in json.loads(head["revoked_keys"]):
            assert all(c["public_key_sha256"] != key for c in active), f"device {device}: revoked key active"
    return {"devices": len(heads), "certificates": len(certificates), "bindings": len(bindings)}
