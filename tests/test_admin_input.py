"""What an admin sends that the CA must refuse cleanly: odd CA names, validities, JSON strings, races."""

import json
import threading
from concurrent.futures import ThreadPoolExecutor

import pytest

from shared.composition import build_service
from shared.errors import CaError, Conflict
from shared.pki import PkiError

from .apiclient import bearer, make_api
from .conftest import run_cli, settings_environment


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("common_name", "Line\x00One", "invalid-common-name"),
        ("common_name", "Line\nOne", "invalid-common-name"),
        ("common_name", "Line \ud800", "invalid-common-name"),
        ("common_name", " padded", "invalid-common-name"),
        ("common_name", "x" * 65, "invalid-common-name"),
        ("organization", "Acme\x07", "invalid-organization"),
        ("organization", "", "invalid-organization"),
        ("days", 1e-300, "validity-too-short"),
        ("days", 0.5, "validity-too-short"),
        ("days", 0, "invalid-validity"),
        ("days", -3, "invalid-validity"),
        ("days", float("nan"), "invalid-validity"),
        ("days", float("inf"), "invalid-validity"),
        ("days", 1e12, "invalid-validity"),
    ],
)
def test_intermediates_refuse_what_no_careful_ca_signs(service, field, value, code):
    keys_before = sorted(service.keys.directory.iterdir())
    with pytest.raises(PkiError) as refused:
        service.create_intermediate("line-9", **{field: value})
    assert refused.value.code == code
    assert service.ledger.get_ca("line-9") is None
    assert sorted(service.keys.directory.iterdir()) == keys_before, "a refused CA left a key behind"


def test_an_intermediate_cut_to_less_than_a_day_by_its_root_is_refused(make_service, clock):
    ca = make_service()
    ca.create_root(days=2)
    clock.advance(days=1, hours=12)
    with pytest.raises(PkiError) as refused:
        ca.create_intermediate("late")
    assert refused.value.code == "validity-too-short" and "cut to end with the issuer" in refused.value.message


def test_a_day_is_enough(service):
    record = service.create_intermediate("one-day", days=1).record
    assert (record.not_after - record.not_before).total_seconds() >= 86400


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("PUT", "/api/factories/factory-one/intermediates", {"intermediates": ["\ud800"]}),
        ("POST", "/api/factories", {"name": "acme", "intermediates": ["factory-a"], "appId": "\ud800"}),
        ("POST", "/api/ca/intermediates", {"id": "line-7", "commonName": "Line \udfff"}),
        ("POST", "/api/certificates/00/revoke", {"reason": "\ud800"}),
        ("POST", "/api/ca/root/proof-of-possession", {"verificationCode": "\ud800"}),
    ],
)
def test_json_strings_that_are_not_valid_unicode_are_a_400(service, method, path, body):
    api = make_api(service)
    before = api.state()
    raw = json.dumps(body)  # escaped as \ud800, as a JSON client sends it
    headers = {**bearer(api.admin), "Content-Type": "application/json"}
    response = api.client.request(method, path, content=raw, headers=headers)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid-request"
    assert "unicode" in response.json()["error"]["message"].lower()
    assert api.state() == before


@pytest.mark.child_process
def test_a_nul_in_a_ca_name_over_http_and_cli(service):
    api = make_api(service)
    response = api.client.post(
        "/api/ca/intermediates", json={"id": "line-8", "commonName": "a\u0000b"}, headers=bearer(api.admin)
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid-common-name"
    tiny = api.client.post("/api/ca/intermediates", json={"id": "line-8", "days": 1e-300}, headers=bearer(api.admin))
    assert tiny.status_code == 400 and tiny.json()["error"]["code"] == "validity-too-short"
    command = ("create-ca-intermediate", "--id", "line-8", "--common-name", "bell\x07")
    done = run_cli(*command, home=service.settings.pki_home, env=settings_environment(service.settings))
    assert done.returncode == 2 and done.stderr.count(b"\n") == 1 and b"printable" in done.stderr
    assert service.ledger.get_ca("line-8") is None


def test_concurrent_creations_of_one_id_leave_one_ca_and_one_key(service):
    """Ten admins create `line-x` at once, on two service instances (two locks, one ledger and key folder)."""
    other = build_service(service.settings)
    try:
        start = threading.Barrier(10)

        def create(index: int):
            start.wait()
            try:
                return (service if index % 2 else other).create_intermediate("line-x").record.id
            except CaError as error:
                return error

        with ThreadPoolExecutor(10) as pool:
            outcomes = list(pool.map(create, range(10)))
    finally:
        other.close()
    assert outcomes.count("line-x") == 1
    assert all(isinstance(o, Conflict) and o.code == "ca-exists" for o in outcomes if o != "line-x")
    record = service.ledger.get_ca("line-x")
    key_files = sorted(p.name for p in service.keys.directory.glob("*-line-x-*.key.pem"))
    assert key_files == [f"{record.key_name}.key.pem"]
    cert_files = sorted(p.name for p in service.keys.directory.glob("*-line-x-*.crt.pem"))
    assert cert_files == [f"{record.key_name}.crt.pem"]


@pytest.mark.parametrize("app_id", ["  ", "a\u0000b", "not-a-guid", "6f2a3c1e-0000-4000-8000-00000000a11"])
def test_application_ids_must_be_guids(service, app_id):
    with pytest.raises(CaError) as refused:
        service.principals.create_factory("acme", ["factory-a"], app_id=app_id)
    assert refused.value.code == "invalid-app-id"
    assert "a GUID" in refused.value.message
    assert service.ledger.get_principal("acme") is None
    stored = service.principals.create_factory("acme", ["factory-a"], app_id=" 6F2A3C1E-0000-4000-8000-00000000A11C ")
    assert stored.principal.app_id == "6f2a3c1e-0000-4000-8000-00000000a11c"


@pytest.mark.parametrize("name", ["Plant_C", "-edge", "x" * 49])
def test_a_principal_name_is_refused_as_a_name_not_as_a_ca_id(service, name):
    from shared.pki import PkiError

    for create in (
        lambda: service.principals.create_factory(name, ["factory-a"]),
        lambda: service.principals.create_admin_key(name),
    ):
        with pytest.raises(PkiError) as refused:
            create()
        assert refused.value.code == "invalid-principal-name"
        assert refused.value.message.startswith(f"principal name {name!r} is not valid")
    assert service.ledger.get_principal(name) is None
