"""The one place that reads settings (the adapters are picked from them in `composition.py`).

Settings come from the environment; `local.settings.json` (its "Values") fills in what the environment
does not set, as the Functions host does. With no settings at all everything runs on this machine.
"""

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from .errors import Misconfigured

if TYPE_CHECKING:
    from .dps.azure import AzureDpsConfig
    from .keys.keyvault import KeyVaultOptions

LOCAL_SETTINGS_FILE = "local.settings.json"
CA_CURVE_NAMES = ("P-256", "P-384")  # shared/pki's CA_CURVES (a test keeps the two the same)


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
    key_vault_url: str | None = None
    key_vault_key_type: str = "EC-HSM"  # EC on a Standard vault
    key_vault_sign_rate: float | None = None  # default: the vault's limit for the key type
    key_vault_parallel_signs: int = 32
    key_vault_retry_seconds: int = 30
    # The ledger in Table Storage: a connection string, or https://<account>.table.core.windows.net
    ledger_tables: str | None = field(default=None, repr=False)
    ledger_table_prefix: str = "deviceca"
    ledger_retry_seconds: int = 30
    # Storage queues (shared/queues.py): QUEUE_STORAGE, a connection string, or for a managed identity
    # QUEUE_STORAGE__queueServiceUri, https://<account>.queue.core.windows.net; neither: in-process queues.
    queue_storage: str | None = field(default=None, repr=False)
    queue_service_uri: str | None = None
    # DPS (shared/dps/azure.py): on when all three of subscription, resource group and name are set.
    dps_subscription_id: str | None = None
    dps_resource_group: str | None = None
    dps_name: str | None = None
    dps_arm_endpoint: str = "https://management.azure.com"
    dps_connection_string: str | None = field(default=None, repr=False)
    dps_allocation_policy: str | None = None
    dps_iot_hubs: tuple[str, ...] = ()
    dps_initial_twin: str | None = None  # JSON
    # The expiry scan (shared/service/expiry.py): days before notAfter from which each kind is a finding,
    # and the timer's NCRONTAB schedule (None: function_app.py's daily default)
    expiry_device_days: int = 30
    expiry_intermediate_days: int = 90
    expiry_root_days: int = 365
    expiry_scan_schedule: str | None = None

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
            ca_curve=_ca_curve(values, cls.ca_curve),
            root_days=_positive_int(values, "ROOT_CERT_DAYS", cls.root_days),
            intermediate_days=_positive_int(values, "INTERMEDIATE_CERT_DAYS", cls.intermediate_days),
            device_days=_positive_int(values, "DEVICE_CERT_DAYS", cls.device_days),
            auth_mode=_choice(values, "PKI_AUTH", ("apikey", "easyauth"), cls.auth_mode),
            key_vault_url=_vault_url(values),
            key_vault_key_type=_choice(values, "KEY_VAULT_KEY_TYPE", ("ec-hsm", "ec"), "ec-hsm").upper(),
            key_vault_sign_rate=_sign_rate(values),
            key_vault_parallel_signs=_positive_int(values, "KEY_VAULT_PARALLEL_SIGNS", cls.key_vault_parallel_signs),
            key_vault_retry_seconds=_positive_int(values, "KEY_VAULT_RETRY_SECONDS", cls.key_vault_retry_seconds),
            ledger_tables=text("LEDGER_TABLES"),
            ledger_table_prefix=text("LEDGER_TABLE_PREFIX", cls.ledger_table_prefix),
            ledger_retry_seconds=_positive_int(values, "LEDGER_RETRY_SECONDS", cls.ledger_retry_seconds),
            queue_storage=text("QUEUE_STORAGE"),
            queue_service_uri=text("QUEUE_STORAGE__queueServiceUri"),
            dps_subscription_id=text("AZURE_SUBSCRIPTION_ID"),
            dps_resource_group=text("RESOURCE_GROUP_NAME"),
            dps_name=text("DPS_NAME"),
            dps_arm_endpoint=text("DPS_ARM_ENDPOINT", cls.dps_arm_endpoint),
            dps_connection_string=text("DPS_CONNECTION_STRING"),
            dps_allocation_policy=text("DPS_ALLOCATION_POLICY"),
            dps_iot_hubs=tuple(hub.strip() for hub in (text("DPS_IOT_HUBS") or "").split(",") if hub.strip()),
            dps_initial_twin=text("DPS_INITIAL_TWIN"),
            expiry_device_days=_positive_int(values, "EXPIRY_DEVICE_DAYS", cls.expiry_device_days),
            expiry_intermediate_days=_positive_int(values, "EXPIRY_INTERMEDIATE_DAYS", cls.expiry_intermediate_days),
            expiry_root_days=_positive_int(values, "EXPIRY_ROOT_DAYS", cls.expiry_root_days),
            expiry_scan_schedule=_ncrontab(values, "EXPIRY_SCAN_SCHEDULE"),
        )

    @property
    def storage_queues(self) -> bool:
        """Whether a Storage account is configured for queues (else the embedded in-process queues)."""
        return bool(self.queue_storage or self.queue_service_uri)

    @property
    def dps_configured(self) -> bool:
        """Whether a real DPS is named (AZURE_SUBSCRIPTION_ID, RESOURCE_GROUP_NAME and DPS_NAME); Misconfigured
        when only some of them are set, since a half-named DPS would silently stay offline."""
        named = {
            "AZURE_SUBSCRIPTION_ID": self.dps_subscription_id,
            "RESOURCE_GROUP_NAME": self.dps_resource_group,
            "DPS_NAME": self.dps_name,
        }
        missing = [name for name, value in named.items() if not value]
        if missing and len(missing) < len(named):
            raise Misconfigured(
                f"DPS is half configured: set {', '.join(missing)} too (or none of them)", "invalid-setting"
            )
        return not missing

    def dps_config(self) -> "AzureDpsConfig":
        """The real DPS these settings name (see `dps_configured`). Misconfigured for DPS_IOT_HUBS without
        DPS_ALLOCATION_POLICY (DPS refuses it: 400004), an unknown policy, or a DPS_INITIAL_TWIN that is not a
        JSON object. The policy is matched without regard to case and written as DPS spells it. "custom" is
        refused too: DPS requires a webhook (customAllocationDefinition) with it, which no setting gives, so
        every enrollment would be refused."""
        from .dps.azure import AzureDpsConfig

        policies = ("hashed", "geoLatency", "static")
        policy = self.dps_allocation_policy
        if policy is not None:  # DPS spells them so; a setting in another case means the same policy
            policy = {known.lower(): known for known in (*policies, "custom")}.get(policy.lower(), policy)
        if policy == "custom":
            raise Misconfigured(
                "setting DPS_ALLOCATION_POLICY=custom is not supported: DPS requires an Azure Function webhook "
                "with it, which this CA does not configure; use hashed, geoLatency or static",
                "invalid-setting",
            )
        if policy is not None and policy not in policies:
            raise Misconfigured(
                f"setting DPS_ALLOCATION_POLICY={policy!r} must be one of: {', '.join(policies)}", "invalid-setting"
            )
        if self.dps_iot_hubs and policy is None:
            raise Misconfigured(
                "setting DPS_IOT_HUBS needs DPS_ALLOCATION_POLICY too (DPS requires it)", "invalid-setting"
            )
        twin = None
        if self.dps_initial_twin is not None:
            try:
                twin = json.loads(self.dps_initial_twin)
            except ValueError:
                twin = None
            if not isinstance(twin, dict):
                raise Misconfigured(
                    "setting DPS_INITIAL_TWIN must be a JSON object (tags, properties.desired)", "invalid-setting"
                )
        return AzureDpsConfig(
            subscription_id=self.dps_subscription_id or "",
            resource_group=self.dps_resource_group or "",
            name=self.dps_name or "",
            arm_endpoint=self.dps_arm_endpoint.rstrip("/"),
            connection_string=self.dps_connection_string,
            allocation_policy=policy,
            iot_hubs=self.dps_iot_hubs,
            initial_twin=twin,
        )

    def key_vault_options(self) -> "KeyVaultOptions":
        from .keys.keyvault import KeyVaultOptions

        hardware = self.key_vault_key_type == "EC-HSM"
        # Key Vault's limits per vault and 10 s for ECC P-256/P-384 signs: 2,000 (HSM), 4,000 (software).
        rate = self.key_vault_sign_rate if self.key_vault_sign_rate is not None else (200.0 if hardware else 400.0)
        return KeyVaultOptions(
            hardware_protected=hardware,
            sign_rate=rate or None,
            parallel_signatures=self.key_vault_parallel_signs,
            retry_seconds=self.key_vault_retry_seconds,
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


def _vault_url(values: Mapping[str, str]) -> str | None:
    """KEY_VAULT_URL: a vault's URI as the portal shows it, https://<vault>.vault.azure.net/ (other clouds'
    hosts too). Misconfigured, without repeating the value (a user:password in it would reach the log),
    for anything else: another scheme, a user or password, a port, a path, a query or a fragment."""
    raw = values.get("KEY_VAULT_URL")
    if raw in (None, ""):
        return None
    try:
        url = urlsplit(raw.strip())
        port = url.port
    except ValueError:
        url, port = None, None
    if (
        url is None
        or url.scheme != "https"
        or not url.hostname
        or not url.hostname.replace("-", "").replace(".", "").isalnum()
        or url.username is not None
        or url.password is not None
        or port is not None
        or url.path not in ("", "/")
        or url.query
        or url.fragment
    ):
        raise Misconfigured(
            "setting KEY_VAULT_URL must be a vault's URI, https://<vault>.vault.azure.net/ (no user or password, "
            "port, path or query); the value is not repeated here",
            "invalid-setting",
        )
    return raw.strip()


def _ncrontab(values: Mapping[str, str], name: str) -> str | None:
    """A timer trigger's NCRONTAB expression: six fields (second minute hour day month day-of-week)."""
    raw = values.get(name)
    if raw in (None, ""):
        return None
    fields = raw.split()
    problem = f"it has {len(fields)}" if len(fields) != 6 else _ncrontab_problem(fields)
    if problem:
        raise Misconfigured(
            f"setting {name}={raw!r} must be an NCRONTAB expression of six fields, like '0 0 6 * * *' "
            f"(second minute hour day month day-of-week): {problem}",
            "invalid-setting",
        )
    return raw


_NCRONTAB_FIELDS = (  # name, lowest, highest (Azure Functions' timer: NCronTab with seconds)
    ("second", 0, 59),
    ("minute", 0, 59),
    ("hour", 0, 23),
    ("day", 1, 31),
    ("month", 1, 12),
    ("day-of-week", 0, 6),
)
_MONTHS = ("JAN", "FEB", "MAR", "APR", "MAY", "JUN", "JUL", "AUG", "SEP", "OCT", "NOV", "DEC")
_DAYS = ("SUN", "MON", "TUE", "WED", "THU", "FRI", "SAT")


def _ncrontab_problem(fields: list[str]) -> str | None:
    """What is wrong with six NCRONTAB fields, or None: each a comma-separated list of *, a number or a
    range a-b (month and day-of-week names too), each optionally /step, within the field's bounds."""
    for (name, low, high), text in zip(_NCRONTAB_FIELDS, fields, strict=True):
        names = _MONTHS if name == "month" else _DAYS if name == "day-of-week" else ()
        for part in text.split(","):
            span, _, step = part.partition("/")
            if step and not (step.isdigit() and 0 < int(step) <= high):
                return f"the {name} field's step {step!r} is not a number from 1 to {high}"
            if span == "*":
                continue
            for end in span.split("-", 1):
                value = names.index(end.upper()) + (name == "month") if end.upper() in names else end
                if not (str(value).isdigit() and low <= int(value) <= high):
                    return f"the {name} field {text!r} is not within {low}-{high}"
    return None


def _sign_rate(values: Mapping[str, str]) -> float | None:
    raw = values.get("KEY_VAULT_SIGN_RATE")
    if raw in (None, ""):
        return None
    try:
        rate = float(raw)
    except ValueError:
        rate = -1.0
    if rate < 0:
        raise Misconfigured(
            f"setting KEY_VAULT_SIGN_RATE={raw!r} must be signs per second (0: no pacing)", "invalid-setting"
        )
    return rate


def _choice(values: Mapping[str, str], name: str, allowed: tuple[str, ...], default: str) -> str:
    raw = (values.get(name) or default).strip().lower()
    if raw not in allowed:
        raise Misconfigured(f"setting {name}={raw!r} must be one of: {', '.join(allowed)}", "invalid-setting")
    return raw


def _ca_curve(values: Mapping[str, str], default: str) -> str:
    """CA_CURVE, upper case: P-256 or P-384 (shared/pki's CA curves), checked here so that its error names the
    setting (a --curve option is checked by the CLI, a "curve" field by the API)."""
    raw = values.get("CA_CURVE") or default
    if raw.strip().upper() not in CA_CURVE_NAMES:
        raise Misconfigured(f"setting CA_CURVE={raw!r} must be one of: {', '.join(CA_CURVE_NAMES)}", "invalid-setting")
    return raw.strip().upper()


def _local_settings(path: Path) -> dict[str, str]:
    try:
        document: Any = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as error:
        raise Misconfigured(f"{path} is not valid JSON: {error}", "invalid-settings-file") from None
    values = document.get("Values", {}) if isinstance(document, dict) else {}
    return {str(k): str(v) for k, v in values.items() if v is not None}
