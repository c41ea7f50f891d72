"""PKI_AUTH=easyauth: App Service authentication's X-MS-CLIENT-PRINCIPAL decides, and only then."""

import base64
import json

import pytest
from fastapi.testclient import TestClient

from shared.api import create_app

from .apiclient import bearer
from .csrs import make_csr

FACTORY_APP = "6f2a3c1e-0000-4000-8000-00000000a11c"


def principal(roles: list[str], app_id: str | None = None, role_typ: str = "roles") -> dict[str, str]:
    claims = [{"typ": role_typ, "val": role} for role in roles] + [{"typ": "name", "val": "Alice Admin"}]
    if app_id:
        claims.append({"typ": "appid", "val": app_id})
    document = {"auth_typ": "aad", "name_typ": "name", "role_typ": role_typ, "claims": claims}
    return {"X-MS-CLIENT-PRINCIPAL": base64.b64encode(json.dumps(document).encode()).decode()}


def _with_claim(kind: str, value, roles=("PKI.Factory",)) -> dict[str, str]:
    """A principal (a factory's by default) with one more claim, as raw JSON (lone surrogates survive
    json.dumps escaped). Only role claims carry roles: `{"typ": "name", "val": "PKI.Admin"}` is a name."""
    claims = [{"typ": "roles", "val": role} for role in roles] + [{"typ": "appid", "val": FACTORY_APP}]
    document = {"auth_typ": "aad", "claims": [*claims, {"typ": kind, "val": value}]}
    return {"X-MS-CLIENT-PRINCIPAL": base64.b64encode(json.dumps(document).encode()).decode()}


@pytest.fixture
def easy(make_service):
    ca = make_service(auth_mode="easyauth")
    ca.create_root()
    ca.create_intermediate("factory-a")
    ca.principals.create_factory("line-1", ["factory-a"], app_id=FACTORY_APP.upper())
    return ca, TestClient(create_app(ca), raise_server_exceptions=False)


def _sign(client, device: str, headers: dict[str, str]):
    return client.post(
        f"/api/devices/{device}/certificate",
        content=make_csr(device),
        headers={**headers, "Content-Type": "application/pkcs10"},
    )


def test_admin_role(easy):
    _, client = easy
    assert client.get("/api/ca/root", headers=principal(["PKI.Admin"])).status_code == 200
    role_claim = "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"
    assert client.get("/api/ca/root", headers=principal(["PKI.Admin"], role_typ=role_claim)).status_code == 200


def test_factory_role_is_the_factory_bound_to_the_application(easy):
    ca, client = easy
    response = _sign(client, "dev-1", principal(["PKI.Factory"], FACTORY_APP))
    assert response.status_code == 201, response.text
    assert ca.certificate(response.json()["serialNumber"]).requested_by == "line-1"
    assert client.get("/api/ca/root", headers=principal(["PKI.Factory"], FACTORY_APP)).status_code == 403


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({}, 401, "no-principal"),
        ({"X-MS-CLIENT-PRINCIPAL": "not base64!"}, 401, "invalid-principal"),
        ({"X-MS-CLIENT-PRINCIPAL": base64.b64encode(b"[1, 2]").decode()}, 401, "invalid-principal"),
        (principal([]), 403, "no-role"),
        (principal(["PKI.Reader"]), 403, "no-role"),
        (principal(["PKI.Factory"]), 403, "no-app-id"),
        (principal(["PKI.Factory"], "00000000-0000-0000-0000-000000000000"), 403, "unknown-application"),
        (_with_claim("name", "PKI.Admin", roles=[]), 403, "no-role"),
        (_with_claim("groups", "PKI.Admin", roles=[]), 403, "no-role"),
        ({"X-MS-CLIENT-PRINCIPAL": base64.b64encode(b"[" * 20000 + b"]" * 20000).decode()}, 401, "invalid-principal"),
        (_with_claim("name", "Mallory \ud800"), 401, "invalid-principal"),
        (_with_claim("appid", "\u0000" + FACTORY_APP), 401, "invalid-principal"),
        (_with_claim("name", 5), 401, "invalid-principal"),
        (_with_claim("name", "x" * 100000), 401, "invalid-principal"),
    ],
    ids=lambda value: None if isinstance(value, dict) else str(value),
)
def test_refused_principals(easy, headers, status, code):
    ca, client = easy
    response = _sign(client, "dev-1", headers)
    assert response.status_code == status
    assert response.json()["error"]["code"] == code
    assert ca.ledger.active_certificates(["dev-1"]) == {}


def test_api_keys_are_not_honoured_in_easyauth_mode(easy):
    ca, client = easy
    key = ca.principals.create_admin_key().secret
    response = client.get("/api/ca/root", headers=bearer(key))
    assert response.status_code == 401 and response.json()["error"]["code"] == "no-principal"


def test_the_header_is_ignored_in_apikey_mode(service):
    client = TestClient(create_app(service), raise_server_exceptions=False)
    response = client.get("/api/ca/root", headers=principal(["PKI.Admin"]))
    assert response.status_code == 401 and response.json()["error"]["code"] == "missing-credentials"
