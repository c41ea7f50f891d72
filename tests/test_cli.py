"""The CLI: the seed's flow end to end, --help and --json on every command, one-line errors."""

import json
import stat
import subprocess

import pytest

from shared.config import CA_CURVE_NAMES
from shared.ledger.sqlite import SqliteLedger
from shared.pki import CA_CURVES, PkiError, check_ca_id
from shared.pki.revocation import REVOCATION_REASONS
from shared.service.access import split_api_key

from .certrules import check_device, check_intermediate, check_ledger, check_proof_of_possession, check_root, load
from .conftest import run_cli, settings_environment
from .csrs import make_csr

COMMANDS = [
    "create-ca-root",
    "show-ca-root",
    "proof-ca-root-possession",
    "create-ca-intermediate",
    "list-intermediates",
    "disable-intermediate",
    "enable-intermediate",
    "create-device-cert",
    "sign-csr",
    "sign-batch",
    "list-certificates",
    "check-expiring",
    "revoke",
    "create-factory",
    "bind-factory",
    "list-factories",
    "create-admin-key",
    "create-api-key",
    "revoke-key",
    "list-keys",
    "serve",
]


def _json(result) -> dict:
    assert result.returncode == 0, result.stderr.decode()
    return json.loads(result.stdout)


def test_seed_flow_end_to_end(tmp_path):
    home = tmp_path / "pki"
    root = _json(run_cli("create-ca-root", "--out", str(tmp_path / "root.pem"), "--json", home=home))
    assert root["kind"] == "root" and root["dps"]["mode"] == "offline"
    root_cert = load((tmp_path / "root.pem").read_bytes())
    check_root(root_cert)

    proof = _json(run_cli("proof-ca-root-possession", "--verification-code", "ABC123", "--json", home=home))
    check_proof_of_possession(load((tmp_path / "verification-ABC123.pem").read_bytes()), root_cert, "ABC123")
    assert proof["file"] == "verification-ABC123.pem"

    intermediate = _json(run_cli("create-ca-intermediate", "--id", "factory-a", "--json", home=home))
    intermediate_cert = load(intermediate["certificate"])
    check_intermediate(intermediate_cert, root_cert)

    device = _json(run_cli("create-device-cert", "--device-id", "dev-1", "--json", home=home))
    out = tmp_path / "devices" / "dev-1"
    assert device["files"]["key"] == str(out.relative_to(tmp_path) / "device.key.pem")
    assert stat.S_IMODE((out / "device.key.pem").stat().st_mode) == 0o600
    check_device(load((out / "device.cert.pem").read_bytes()), intermediate_cert, "dev-1")
    assert json.loads((out / "bundle.json").read_text())["serialNumber"] == device["serialNumber"]
    registration = json.loads((out / "registration.json").read_text())
    assert registration["registrationId"] == "dev-1"
    assert registration["globalEndpoint"] == "global.azure-devices-provisioning.net"
    verify = subprocess.run(
        [
            "openssl",
            "verify",
            "-CAfile",
            str(tmp_path / "root.pem"),
            "-untrusted",
            str(out / "device.chain.pem"),
            str(out / "device.cert.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert verify.returncode == 0 and verify.stdout.strip().endswith("OK"), verify.stderr

    listed = _json(run_cli("list-intermediates", "--json", home=home))
    assert [(i["id"], i["default"]) for i in listed] == [("factory-a", True)]
    certificates = _json(run_cli("list-certificates", "--device-id", "dev-1", "--json", home=home))
    assert [c["serialNumber"] for c in certificates["items"]] == [device["serialNumber"]]
    ledger = SqliteLedger(home / "ledger.sqlite3")
    assert check_ledger(ledger) == 3
    ledger.close()


def test_sign_csr_from_stdin_is_idempotent(service, tmp_path):
    home = service.settings.pki_home
    env = settings_environment(service.settings)
    csr = make_csr("dev-7")
    first = _json(run_cli("sign-csr", "-", "--device-id", "dev-7", "--json", home=home, env=env, stdin=csr))
    again = run_cli("sign-csr", "-", "--device-id", "dev-7", home=home, env=env, stdin=csr)
    assert again.returncode == 0
    assert b"Already issued" in again.stdout and first["serialNumber"].encode() in again.stdout
    other = run_cli("sign-csr", "-", "--device-id", "dev-7", home=home, env=env, stdin=make_csr("dev-7"))
    assert other.returncode == 1 and b"--renew" in other.stderr and b"renewal" in other.stderr
    renewed = _json(
        run_cli(
            "sign-csr", "-", "--device-id", "dev-7", "--renew", "--json", home=home, env=env, stdin=make_csr("dev-7")
        )
    )
    assert renewed["serialNumber"] != first["serialNumber"]


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_explains_itself_and_takes_json(command, tmp_path):
    result = run_cli(command, "--help", home=tmp_path / "pki")
    assert result.returncode == 0
    assert b"--json" in result.stdout


def test_top_level_help_lists_commands(tmp_path):
    result = run_cli("--help", home=tmp_path / "pki")
    for command in COMMANDS:
        assert command.encode() in result.stdout


def test_errors_are_one_line(tmp_path):
    home = tmp_path / "pki"
    result = run_cli("create-ca-intermediate", home=home)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"error: there is no CA root yet; create it with create-ca-root (the CA under PKI_HOME={home.resolve()})"
    ]
    result = run_cli("revoke", "nothex", "--json", home=home)
    assert result.returncode == 2 and json.loads(result.stdout)["error"]["code"] == "invalid-serial"  # the rule's
    assert "serial 'nothex' is not a hexadecimal number" in result.stderr.decode()


def test_a_value_that_breaks_its_rule_is_reported_before_anything_is_looked_up(tmp_path):
    """README "The commands": status 2 and the rule, not what a lookup of the bad value would have said."""
    home = tmp_path / "pki"
    result = run_cli("revoke", "6B55", "--reason", "bogus", home=home)
    assert result.returncode == 2 and result.stdout == b""
    assert result.stderr.decode().splitlines() == [
        "error: argument --reason: revocation reason 'bogus' is not one of RFC 5280's: "
        + ", ".join(REVOCATION_REASONS)
        + " (see 'python cli.py revoke --help')"
    ]
    result = run_cli("create-factory", "Line_2", "--intermediate", "nope", home=home)
    assert result.returncode == 2 and b"principal name 'Line_2' is not valid" in result.stderr
    assert not home.exists() or not any(home.rglob("*.pem"))


@pytest.mark.parametrize("command", [("create-ca-intermediate", "--id"), ("create-factory", "name")])
def test_the_help_of_ids_says_the_rule_the_service_checks(command, tmp_path):
    with pytest.raises(PkiError) as refused:
        check_ca_id("-")
    rule = refused.value.message.split(": use ", 1)[1]  # "1-48 lowercase letters, ..."
    result = run_cli(command[0], "--help", home=tmp_path / "pki")
    help_text = " ".join(result.stdout.decode().split())
    assert result.returncode == 0 and f"{command[1]} " in help_text and rule in help_text


def test_revoke_key_takes_the_whole_key_and_never_prints_its_secret(tmp_path):
    home = tmp_path / "pki"
    for command in (["create-ca-root"], ["create-ca-intermediate", "--id", "line-1"]):
        assert run_cli(*command, home=home).returncode == 0
    key = _json(run_cli("create-factory", "plant-7", "--intermediate", "line-1", "--json", home=home))["apiKey"]
    key_id, secret = split_api_key(key)
    for argv in (("revoke-key", key), ("revoke-key", key, "--json")):
        result = run_cli(*argv, home=home)
        assert result.returncode == 0 and secret.encode() not in result.stdout + result.stderr
        if "--json" not in argv:
            assert result.stdout.decode().strip() == f"Revoked API key {key_id} of plant-7."
    # revoking again changes nothing, and says so (status 0: the key is revoked, as asked)
    for again in (key, key_id):
        result = run_cli("revoke-key", again, home=home)
        assert result.returncode == 0 and secret.encode() not in result.stdout + result.stderr
        assert result.stdout.decode().startswith(f"API key {key_id} of plant-7 was already revoked (")
        assert result.stdout.decode().strip().endswith("; nothing was changed.")
    assert [k["revokedAt"] is not None for k in _json(run_cli("list-keys", "--json", home=home))] == [True]
    # a key that is not whole, or a principal's name given a key: refused, without the secret
    for argv in (("revoke-key", key[:-1]), ("revoke-key", secret), ("create-api-key", key), ("bind-factory", key)):
        result = run_cli(*argv, "--json", home=home)
        assert result.returncode == 2, argv
        assert secret[:-1].encode() not in result.stdout + result.stderr, argv


def test_a_factory_is_rebound_to_new_intermediates_and_keeps_its_key(tmp_path):
    home = tmp_path / "pki"
    for command in (["create-ca-root"], ["create-ca-intermediate", "--id", "line-1"]):
        assert run_cli(*command, home=home).returncode == 0
    assert run_cli("create-ca-intermediate", "--id", "line-2", home=home).returncode == 0
    key = _json(run_cli("create-factory", "plant-7", "--intermediate", "line-1", "--json", home=home))["apiKey"]
    result = run_cli("bind-factory", "plant-7", "--intermediate", "line-2", "--intermediate", "line-1", home=home)
    assert result.stdout.decode().strip() == (
        "Factory plant-7 now signs with line-2, line-1 (before: line-1). Its API keys are unchanged."
    )
    listed = _json(run_cli("list-factories", "--json", home=home))
    assert [(f["id"], f["intermediates"]) for f in listed] == [("plant-7", ["line-2", "line-1"])]
    assert run_cli("list-factories", home=home).stdout.decode().splitlines()[1].split()[:2] == [
        "plant-7",
        "line-2,line-1",
    ]
    keys = _json(run_cli("list-keys", "--json", home=home))
    assert [k["principalId"] for k in keys] == ["plant-7"] and key.split("_")[1] == keys[0]["id"]
    result = run_cli("bind-factory", "plant-7", "--intermediate", "line-9", home=home)
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        f"error: no intermediate with ID 'line-9' (the CA under PKI_HOME={home.resolve()})"
    ]


def test_bad_setting_is_one_line(tmp_path):
    result = run_cli("list-intermediates", home=tmp_path / "pki", env={"DEVICE_CERT_DAYS": "soon"})
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == [
        "error: setting DEVICE_CERT_DAYS='soon' must be a positive whole number"
    ]


def test_a_ca_curve_setting_that_is_not_accepted_names_the_setting(tmp_path):
    home = tmp_path / "pki"
    result = run_cli("create-ca-root", home=home, env={"CA_CURVE": "P-521"})
    assert result.returncode == 1
    assert result.stderr.decode().splitlines() == ["error: setting CA_CURVE='P-521' must be one of: P-256, P-384"]
    assert not home.exists() or not list(home.rglob("*.pem"))
    assert tuple(CA_CURVES) == CA_CURVE_NAMES  # the setting's names are shared/pki's CA curves
    assert _json(run_cli("create-ca-root", "--json", home=home, env={"CA_CURVE": " p-384"}))["curve"] == "P-384"


def test_json_is_taken_before_the_command_too(tmp_path):
    home = tmp_path / "pki"
    assert _json(run_cli("--json", "list-keys", home=home)) == []
    refused = run_cli("--json", "bind-factory", "plant-1", "--intermediate", "line-1", home=home)
    assert refused.returncode == 1
    assert json.loads(refused.stdout)["error"]["code"] == "principal-not-found"
    usage = run_cli("--json", "list-keys", "--nope", home=home)
    assert usage.returncode == 2 and json.loads(usage.stdout)["error"]["code"] == "usage"


def test_disabling_or_enabling_an_intermediate_twice_says_it_already_was(tmp_path):
    home = tmp_path / "pki"
    assert run_cli("create-ca-root", home=home).returncode == 0
    assert run_cli("create-ca-intermediate", "--id", "line-1", home=home).returncode == 0
    said = []
    for command in ("disable-intermediate", "disable-intermediate", "enable-intermediate", "enable-intermediate"):
        result = run_cli(command, "line-1", home=home)
        assert result.returncode == 0, result.stderr
        said.append(result.stdout.decode().splitlines()[0])
    assert said == [
        "Disabled intermediate line-1.",
        "Intermediate line-1 was already disabled.",
        "Enabled intermediate line-1.",
        "Intermediate line-1 was already enabled.",
    ]


def test_local_settings_file_is_read(tmp_path):
    (tmp_path / "local.settings.json").write_text(json.dumps({"Values": {"CA_NAME": "Acme Devices"}}))
    root = _json(run_cli("create-ca-root", "--json", home=tmp_path / "pki", cwd=tmp_path))
    assert root["commonName"] == "Acme Devices Root"
