"""PKI_AUTH=easyauth: App Service authentication's X-MS-CLIENT-PRINCIPAL decides, and only then."""

import asyncio
import base64
import json

import pytest
from fastapi.testclient import TestClient
from starlette.requests import Request

from shared.api import create_app
from shared.api.auth import authenticate

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


def _encoded(document: dict) -> dict[str, str]:
    return {"X-MS-CLIENT-PRINCIPAL": base64.b64encode(json.dumps(document).encode()).decode()}


def test_refusals_say_what_is_wrong_with_the_principal(easy):
    _, client = easy
    for headers in ({}, {"X-MS-CLIENT-PRINCIPAL": "not base64!"}):
        message = client.get("/api/ca/root", headers=headers).json()["error"]["message"]
        assert isinstance(message, str) and "X-MS-CLIENT-PRINCIPAL" in message
    message = client.get("/api/ca/root", headers=principal(["PKI.Factory"], FACTORY_APP.replace("a11c", "0000")))
    assert message.json()["error"]["message"] == (
        f"no factory is bound to application ID {FACTORY_APP.replace('a11c', '0000')}"
    )


def test_the_principal_must_be_strict_base64(easy):
    """A header with characters outside the base64 alphabet is refused, not read with them skipped."""
    _, client = easy
    good = principal(["PKI.Admin"])["X-MS-CLIENT-PRINCIPAL"]
    assert client.get("/api/ca/root", headers={"X-MS-CLIENT-PRINCIPAL": good}).status_code == 200
    response = client.get("/api/ca/root", headers={"X-MS-CLIENT-PRINCIPAL": good[:8] + "*" + good[8:]})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid-principal"


def test_the_role_claim_type_is_the_one_the_principal_names(easy):
    """role_typ names the claim that carries roles: a custom one counts, and only for its own document."""
    _, client = easy
    claims = [{"typ": "app-roles", "val": "PKI.Admin"}]
    assert client.get("/api/ca/root", headers=_encoded({"role_typ": "app-roles", "claims": claims})).status_code == 200
    response = client.get("/api/ca/root", headers=_encoded({"claims": claims}))
    assert response.status_code == 403 and response.json()["error"]["code"] == "no-role"


def test_principal_limits_are_inclusive(easy):
    """A header of exactly MAX_PRINCIPAL_BYTES and claims of exactly MAX_CLAIM_CHARACTERS are read."""
    from shared.api.auth import MAX_CLAIM_CHARACTERS, MAX_PRINCIPAL_BYTES

    _, client = easy
    claims = [{"typ": "roles", "val": "PKI.Admin"}, {"typ": "name", "val": "n" * MAX_CLAIM_CHARACTERS}]
    text = json.dumps({"claims": claims})
    assert client.get("/api/ca/root", headers=_encoded({"claims": claims})).status_code == 200
    filler = {"typ": "filler", "val": "f" * 400}
    while len(text) < MAX_PRINCIPAL_BYTES * 3 // 4 - 500:
        claims.append(filler)
        text = json.dumps({"claims": claims})
    text = text.ljust(MAX_PRINCIPAL_BYTES * 3 // 4)  # JSON allows trailing whitespace
    header = base64.b64encode(text.encode()).decode()
    assert len(header) == MAX_PRINCIPAL_BYTES
    assert client.get("/api/ca/root", headers={"X-MS-CLIENT-PRINCIPAL": header}).status_code == 200
    header = base64.b64encode((text + "    ").encode()).decode()
    response = client.get("/api/ca/root", headers={"X-MS-CLIENT-PRINCIPAL": header})
    assert response.status_code == 401 and response.json()["error"]["code"] == "invalid-principal"


def test_a_factory_found_by_application_is_an_easyauth_caller(easy):
    ca, _ = easy
    caller = ca.principals.factory_for_app(FACTORY_APP)
    assert (caller.id, caller.role, caller.intermediates, caller.via) == (
        "line-1",
        "factory",
        ("factory-a",),
        "easyauth",
    )


def test_an_admin_is_an_easyauth_caller(easy):
    """An admin that Easy Auth signed in is marked as such, as a factory found by its application is."""
    _, client = easy
    header = principal(["PKI.Admin"])["X-MS-CLIENT-PRINCIPAL"]
    request = Request({"type": "http", "app": client.app, "headers": [(b"x-ms-client-principal", header.encode())]})
    caller = asyncio.run(authenticate(request))
    assert (caller.id, caller.role, caller.intermediates, caller.via) == (
        "entra:Alice Admin",
        "admin",
        None,
        "easyauth",
    )


def test_only_the_role_claim_types_carry_roles(easy):
    """Claim types are compared exactly: without role_typ, only the standard role claims carry roles."""
    _, client = easy
    for kind in ("roles", "http://schemas.microsoft.com/ws/2008/06/identity/claims/role"):
        headers = _encoded({"claims": [{"typ": kind, "val": "PKI.Admin"}]})
        assert client.get("/api/ca/root", headers=headers).status_code == 200, kind
    for kind in ("ROLES", "Roles", "role"):
        response = client.get("/api/ca/root", headers=_encoded({"claims": [{"typ": kind, "val": "PKI.Admin"}]}))
        assert response.status_code == 403 and response.json()["error"]["code"] == "no-role", kind


def test_an_admin_is_recorded_by_its_name_claim(easy):
    """What an Easy Auth admin signs is recorded as requested by `entra:<name>`, or `entra:unnamed`."""
    ca, client = easy
    nameless = _encoded({"claims": [{"typ": "roles", "val": "PKI.Admin"}]})
    for device, headers, expected in (
        ("dev-1", principal(["PKI.Admin"]), "entra:Alice Admin"),
        ("dev-2", nameless, "entra:unnamed"),
    ):
        response = client.post(
            f"/api/devices/{device}/certificate?intermediateId=factory-a",
            content=make_csr(device),
            headers={**headers, "Content-Type": "application/pkcs10"},
        )
        assert response.status_code == 201, response.text
        assert ca.certificate(response.json()["serialNumber"]).requested_by == expected


def test_role_refusals_say_what_is_missing(easy):
    _, client = easy
    for headers, words in (
        (principal(["PKI.Factory"]), "no application ID claim"),
        (principal(["PKI.Reader"]), "neither the PKI.Admin nor the PKI.Factory app role"),
    ):
        message = client.get("/api/ca/root", headers=headers).json()["error"]["message"]
        assert isinstance(message, str) and words in message
