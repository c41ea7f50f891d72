-- The SQLite ledger schema version 2 (as shared/ledger/sqlite.py made it before the expiry scan), for the
-- migration test in tests/test_ledger_sqlite.py.
CREATE TABLE IF NOT EXISTS cas (
  id TEXT PRIMARY KEY,
  kind TEXT NOT NULL CHECK (kind IN ('root', 'intermediate')),
  common_name TEXT NOT NULL,
  curve TEXT NOT NULL,
  key_name TEXT NOT NULL,
  key_backend TEXT NOT NULL,
  serial TEXT NOT NULL UNIQUE,
  not_before TEXT NOT NULL,
  not_after TEXT NOT NULL,
  certificate_pem TEXT NOT NULL,
  issuer_id TEXT REFERENCES cas(id),
  created_at TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('active', 'disabled')),
  dps TEXT NOT NULL DEFAULT '{}'
);
CREATE UNIQUE INDEX IF NOT EXISTS one_root ON cas(kind) WHERE kind = 'root';

-- A device belongs to the principal whose request first certified it (DESIGN "Who owns a device").
CREATE TABLE IF NOT EXISTS devices (
  device_id TEXT PRIMARY KEY,
  owner TEXT NOT NULL,
  created_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS key_bindings (
  public_key_sha256 TEXT PRIMARY KEY,
  device_id TEXT NOT NULL,
  revoked INTEGER NOT NULL DEFAULT 0
);

CREATE TABLE IF NOT EXISTS certificates (
  seq INTEGER PRIMARY KEY AUTOINCREMENT,
  serial TEXT NOT NULL UNIQUE,
  device_id TEXT NOT NULL,
  intermediate_id TEXT NOT NULL REFERENCES cas(id),
  requested_by TEXT NOT NULL,
  public_key_sha256 TEXT NOT NULL REFERENCES key_bindings(public_key_sha256),
  not_before TEXT NOT NULL,
  not_after TEXT NOT NULL,
  certificate_pem TEXT NOT NULL,
  created_at TEXT NOT NULL,
  status TEXT NOT NULL CHECK (status IN ('active', 'superseded', 'revoked')),
  status_changed_at TEXT,
  status_reason TEXT
);
CREATE UNIQUE INDEX IF NOT EXISTS one_active_certificate_per_device
  ON certificates(device_id) WHERE status = 'active';
CREATE INDEX IF NOT EXISTS certificates_by_device ON certificates(device_id);
CREATE INDEX IF NOT EXISTS certificates_by_intermediate ON certificates(intermediate_id);
CREATE INDEX IF NOT EXISTS certificates_by_not_after ON certificates(not_after);

CREATE TABLE IF NOT EXISTS principals (
  id TEXT PRIMARY KEY,
  role TEXT NOT NULL CHECK (role IN ('admin', 'factory')),
  intermediates TEXT NOT NULL DEFAULT '[]',
  app_id TEXT UNIQUE,
  created_at TEXT NOT NULL
);

CREATE TABLE IF NOT EXISTS api_keys (
  id TEXT PRIMARY KEY,
  principal_id TEXT NOT NULL REFERENCES principals(id),
  secret_sha256 TEXT NOT NULL,
  created_at TEXT NOT NULL,
  revoked_at TEXT
);

-- A certificate's key must be bound to its device and not revoked: the store refuses anything else.
CREATE TRIGGER IF NOT EXISTS certificate_key_bound_to_device BEFORE INSERT ON certificates
WHEN NOT EXISTS (
  SELECT 1 FROM key_bindings b
  WHERE b.public_key_sha256 = NEW.public_key_sha256 AND b.device_id = NEW.device_id AND b.revoked = 0
)
BEGIN SELECT RAISE(ABORT, 'public key is not bound to this device'); END;

-- Every certificate's device has an owner.
CREATE TRIGGER IF NOT EXISTS certificate_device_owned BEFORE INSERT ON certificates
WHEN NOT EXISTS (SELECT 1 FROM devices d WHERE d.device_id = NEW.device_id)
BEGIN SELECT RAISE(ABORT, 'device has no owner'); END;
PRAGMA user_version = 2;
