"""The one place that reads settings and picks adapters.

Settings come from the environment; `local.settings.json` (its "Values") fills in what the environment
does not set, as the Functions host does. With no settings at all everything runs on this machine.
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import Misconfigured

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from .service import DeviceCA

LOCAL_SETTINGS_FILE = "local.settings.json"


@dataclass(frozen=True)
class Settings:
    pki_home: Path = Path(".pki")
    key_passphrase: str | None = field(default=None, repr=False)
    ca_name: str = "Device CA"
    ca_curve: str = "P-256"
    root_days: int = 7300
    intermediate_days: int = 3650
    device_days: int = 365
    auth_mode: str = "apikey"  # or "easyauth": trust App Service authentication's X-MS-CLIENT-PRINCIPAL

    @classmethod
    def load(cls, environ: Mapping[str, str] | None = None, settings_file: Path | None = None) -> "Settings":
        values = dict(_local_settings(settings_file or Path(LOCAL_SETTINGS_FILE)))
        values.update(os.environ if environ is None else environ)
        return cls.from_values(values)

    @classmethod
    def from_values(cls, values: Mapping[str, str]) -> "Settings":
        def text(name: str, default: str | None = None) -> str | None:
            value = values.get(name)
            return value if value not in (None, "") else default

        return cls(
            pki_home=Path(text("PKI_HOME", ".pki")),
            key_passphrase=text("PKI_KEY_PASSPHRASE"),
            ca_name=text("CA_NAME", cls.ca_name),
            ca_curve=text("CA_CURVE", cls.ca_curve).upper(),
            root_days=_positive_int(values, "ROOT_CERT_DAYS", cls.root_days),
            intermediate_days=_positive_int(values, "INTERMEDIATE_CERT_DAYS", cls.intermediate_days),
            device_days=_positive_int(values, "DEVICE_CERT_DAYS", cls.device_days),
            auth_mode=_choice(values, "PKI_AUTH", ("apikey", "easyauth"), cls.auth_mode),
        )


def _positive_int(values: Mapping[str, str], name: str, default: int) -> int:
    raw = values.get(name)
    if raw in (None, ""):
        return default
    try:
        number = int(raw)
    except ValueError:
        number = 0
    if number <= 0:
        raise Misconfigured(f"setting {name}={raw!r} must be a positive whole number", "invalid-setting")
    return number


def _choice(values: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = (values.get(name) or default).strip().lower()
    if raw not in allowed:
        raise Misconfigured(f"setting {name}={raw!r} must be one of: {', '.join(allowed)}", "invalid-setting")
    return raw


def _local_settings(path: Path) -> dict[str, str]:
    try:
        document: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise Misconfigured(f"{path} is not valid JSON: {error}", "invalid-settings-file") from None
    values = document.get("Values", {}) if isinstance(document, dict) else {}
    return {str(k): str(v) for k, v in values.items() if v is not None}


def build_service(settings: Settings | None = None, clock: "Callable[[], datetime] | None" = None) -> "DeviceCA":
    """The service wired to the adapters the settings ask for."""
    from .dps.offline import OfflineDps
    from .keys.local import LocalKeyStore
    from .ledger.sqlite import SqliteLedger
    from .service import DeviceCA, utcnow

    settings = settings or Settings.load()
    home = settings.pki_home
    keys = LocalKeyStore(home, settings.key_passphrase)
    ledger = SqliteLedger(home / "ledger.sqlite3")
    dps = OfflineDps(home)
    return DeviceCA(keys=keys, ledger=ledger, dps=dps, settings=settings, clock=clock or utcnow)
