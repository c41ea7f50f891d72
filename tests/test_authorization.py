"""Every route, for every kind of caller → the expected status; nothing changes unless the answer is 2xx."""

import itertools

import pytest
from fastapi.testclient import TestClient
from pydantic import BaseModel

from shared.api import create_app
from shared.api.auth import AdminCaller, AnyCaller, AuthenticatedRoute

from .apiclient import bearer, make_api
from .certrules import check_proof_of_possession, load
from .csrs import make_csr

CALLERS = ("none", "bad", "revoked", "factory", "other-factory", "admin")
ADMIN_ONLY = (401, 401, 401, 403, 403)
_counter = itertools.count()


def _fresh(prefix: str) -> str:
    return f"{prefix}-{next(_counter)}"


def _issued_by_factory_a(api) -> str:
    device = _fresh("dev-owned")
    return api.service.sign_csr(make_csr(device), device, requested_by="factory-one").record.serial


def _throwaway_factory(api) -> str:
    name = _fresh("fac")
    api.service.principals.create_factory(name, ["factory-a"])
    return name


def _throwaway_key(api) -> str:
    return api.service.principals.create_api_key("factory-two").key.id


def _device_request(api):
    device = _fresh("dev")
    return (
        "POST",
        f"/api/devices/{device}/certificate?intermediateId=factory-a",
        {"content": make_csr(device), "headers": {"Content-Type": "application/pkcs10"}},
    )


def _batch_request(api):
    device = _fresh("batch-dev")
    return (
        "POST",
        "/api/batches?intermediateId=factory-a",
        {"json": {"items": [{"deviceId": device, "csr": make_csr(device).decode()}]}},
    )


def _batch_of_factory_a(api) -> str:
    device = _fresh("batch-owned")
    items = [{"deviceId": device, "csr": make_csr(device).decode()}]
    return api.service.submit_batch(items, requested_by="factory-one", allowed_intermediates=["factory-a"]).record.id


# (route, prepare(api) -> (method, path, request kwargs), expected status per caller in CALLERS order)
ROUTES = [
    ("health", lambda api: ("GET", "/api/health", {}), (200,) * 6),
    ("sign device CSR", _device_request, (401, 401, 401, 201, 403, 201)),
    ("show root", lambda api: ("GET", "/api/ca/root", {}), (*ADMIN_ONLY, 200)),
    ("create root", lambda api: ("POST", "/api/ca/root", {}), (*ADMIN_ONLY, 409)),
    (
        "proof of possession",
        lambda api: ("POST", "/api/ca/root/proof-of-possession", {"json": {"verificationCode": "0A1B2C"}}),
        (*ADMIN_ONLY, 200),
    ),
    (
        "create intermediate",
        lambda api: ("POST", "/api/ca/intermediates", {"json": {"id": _fresh("int")}}),
        (*ADMIN_ONLY, 201),
    ),
    ("ca chain", lambda api: ("GET", "/api/ca/chain", {}), (401, 401, 401, 200, 200, 200)),
    ("list intermediates", lambda api: ("GET", "/api/ca/intermediates", {}), (*ADMIN_ONLY, 200)),
    ("show intermediate", lambda api: ("GET", "/api/ca/intermediates/factory-a", {}), (*ADMIN_ONLY, 200)),
    ("disable intermediate", lambda api: ("POST", "/api/ca/intermediates/spare/disable", {}), (*ADMIN_ONLY, 200)),
    ("enable intermediate", lambda api: ("POST", "/api/ca/intermediates/spare/enable", {}), (*ADMIN_ONLY, 200)),
    ("retry dps", lambda api: ("POST", "/api/ca/intermediates/spare/retry-dps", {}), (*ADMIN_ONLY, 200)),
    ("list certificates", lambda api: ("GET", "/api/certificates", {}), (401, 401, 401, 200, 200, 200)),
    (
        "show certificate",
        lambda api: ("GET", f"/api/certificates/{_issued_by_factory_a(api)}", {}),
        (401, 401, 401, 200, 404, 200),
    ),
    (
        "revoke certificate",
        lambda api: (
            "POST",
            f"/api/certificates/{_issued_by_factory_a(api)}/revoke",
            {"json": {"reason": "cessationOfOperation"}},
        ),
        (*ADMIN_ONLY, 200),
    ),
    (
        "create factory",
        lambda api: ("POST", "/api/factories", {"json": {"name": _fresh("fac"), "intermediates": ["factory-a"]}}),
        (*ADMIN_ONLY, 201),
    ),
    ("list factories", lambda api: ("GET", "/api/factories", {}), (*ADMIN_ONLY, 200)),
    (
        "bind factory",
        lambda api: (
            "PUT",
            f"/api/factories/{_throwaway_factory(api)}/intermediates",
            {"json": {"intermediates": ["spare"]}},
        ),
        (*ADMIN_ONLY, 200),
    ),
    ("list keys", lambda api: ("GET", "/api/keys", {}), (*ADMIN_ONLY, 200)),
    ("revoke key", lambda api: ("POST", f"/api/keys/{_throwaway_key(api)}/revoke", {}), (*ADMIN_ONLY, 200)),
    ("submit batch", _batch_request, (401, 401, 401, 202, 403, 202)),
    ("list batches", lambda api: ("GET", "/api/batches", {}), (401, 401, 401, 200, 200, 200)),
    (
        "show batch",
        lambda api: ("GET", f"/api/batches/{_batch_of_factory_a(api)}", {}),
        (401, 401, 401, 200, 404, 200),
    ),
]


@pytest.fixture
def api(service):
    api = make_api(service)
    service.create_intermediate("spare")
    return api


def _key(api, caller: str) -> str | None:
    return {
        "none": None,
        "bad": "dca_0123456789abcdef_" + "x" * 43,
        "revoked": api.revoked,
        "factory": api.factory_a,
        "other-factory": api.factory_b,
        "admin": api.admin,
    }[caller]


@pytest.mark.parametrize(("route", "prepare", "expected"), ROUTES, ids=[r[0] for r in ROUTES])
def test_authorization_matrix(api, route, prepare, expected):
    assert api.client.get("/api/openapi.json").status_code == 200
    for caller, status in zip(CALLERS, expected, strict=True):
        method, path, request = prepare(api)
        headers = {**request.pop("headers", {}), **bearer(_key(api, caller))}
        before = api.state()
        response = api.client.request(method, path, headers=headers, **request)
        assert response.status_code == status, (route, caller, response.text)
        if route == "proof of possession" and status == 200:
            root = load(api.service.root().certificate_pem)
            check_proof_of_possession(load(response.json()["certificate"]), root, "0A1B2C")
        if not 200 <= status < 300:
            assert set(response.json()) == {"error"}
            assert api.state() == before, (route, caller)


def test_every_route_is_in_the_matrix(api):
    paths = api.client.get("/api/openapi.json").json()["paths"]
    routes = {(method.upper(), path) for path, operations in paths.items() for method in operations}
    covered = set()
    for _, prepare, _ in ROUTES:
        method, path, _ = prepare(api)
        covered.add((method, path.split("?")[0]))
    templates = {
        (method, template)
        for method, template in routes
        for covered_method, covered_path in covered
        if method == covered_method and _matches(template, covered_path)
    }
    assert templates == routes


def _matches(template: str, path: str) -> bool:
    parts, actual = template.split("/"), path.split("/")
    return len(parts) == len(actual) and all(p.startswith("{") or p == a for p, a in zip(parts, actual, strict=True))


@pytest.mark.parametrize("body", [b'{"name": 5', b"[1, 2", b"\xff\xfe not JSON", b"{}"])
def test_the_caller_is_checked_before_the_body_on_every_route(api, body):
    """A caller without credentials learns nothing about a route's body from its answer (401 before any
    400), and a factory on an admin route gets 403 before its body is read."""
    paths = api.client.get("/api/openapi.json").json()["paths"]
    sent = 0
    for route, prepare, expected in ROUTES:
        method, path, _ = prepare(api)
        if method not in ("POST", "PUT") or expected[0] == 200:
            continue
        for caller, status in (("none", 401), ("bad", 401), ("revoked", 401), ("factory", expected[3])):
            if status >= 200 and status < 300:
                continue
            headers = {"Content-Type": "application/json", **bearer(_key(api, caller))}
            before = api.state()
            response = api.client.request(method, path, content=body, headers=headers)
            assert response.status_code == status, (route, caller, response.text)
            assert api.state() == before
            sent += 1
    bodies = {(m.upper(), p) for p, ops in paths.items() for m, op in ops.items() if "requestBody" in op}
    assert sent >= 3 * len(bodies)  # every route that takes a body was tried


JSON = {"Content-Type": "application/json"}  # FastAPI parses a JSON body (and may refuse it) only when so typed


class _Body(BaseModel):
    name: str


@pytest.mark.parametrize("check", ["any", "admin"])
def test_an_authenticated_route_checks_its_caller_before_fastapi_reads_its_body(api, check):
    """AuthenticatedRoute's own rule, on a route that takes a JSON body and depends on AnyCaller (or
    AdminCaller): the routes above that take bodies all check their caller first anyway."""
    caller_type = AnyCaller if check == "any" else AdminCaller

    def handler(caller: caller_type, body: _Body) -> dict:  # type: ignore[valid-type]
        return {"caller": caller.id, "name": body.name}

    app = create_app(api.service)
    app.router.add_api_route("/api/echo", handler, methods=["POST"], route_class_override=AuthenticatedRoute)
    client = TestClient(app, raise_server_exceptions=False)
    for body in (b'{"name": 5', b"{}"):
        for key, status in ((None, 401), ("dca_0123456789abcdef_" + "x" * 43, 401), (api.revoked, 401)):
            response = client.post("/api/echo", content=body, headers={**JSON, **bearer(key)})
            assert response.status_code == status, (body, key, response.text)
        response = client.post("/api/echo", content=body, headers={**JSON, **bearer(api.factory_a)})
        assert response.status_code == (400 if check == "any" else 403), (body, response.text)
    answered = client.post("/api/echo", json={"name": "x"}, headers=bearer(api.admin))
    assert answered.status_code == 200 and answered.json() == {"caller": "admin", "name": "x"}
