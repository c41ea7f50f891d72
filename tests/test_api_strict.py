"""What every route refuses beside its body: query parameters it does not take, filters that break the
CLI's rules, Accept headers it cannot answer; and an OpenAPI document that says so (400s, never 422)."""

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

import cli
from shared import parameters
from shared.api.routes import negotiate

from .apiclient import bearer, make_api
from .certrules import check_device, load, load_chain
from .csrs import make_csr

PEM_CHAIN = "application/pem-certificate-chain"
X_PEM = "application/x-pem-file"
BROWSER = "text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"
# a value for each path parameter: the checks come before the route runs, so they need not exist
PATH_VALUES = {
    "deviceId": "dev-1",
    "serial": "01",
    "intermediateId": "factory-a",
    "batchId": "b1",
    "name": "factory-one",
    "keyId": "k1",
}


@pytest.fixture
def api(service):
    return make_api(service)


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert body["error"]["code"] == code, body
    return body["error"]["message"]


def _operations(api) -> list[tuple[str, str, list[str]]]:
    """Every operation of the OpenAPI document: method, a path to call, its documented query parameters."""
    paths = api.client.get("/api/openapi.json").json()["paths"]
    found = []
    for template, operations in paths.items():
        for method, operation in operations.items():
            query = [p["name"] for p in operation.get("parameters", []) if p["in"] == "query"]
            found.append((method, template.format(**PATH_VALUES), query))
    assert len(found) > 20
    return found


# -- query parameters ----------------------------------------------------------------------------------


def test_every_route_refuses_a_query_parameter_it_does_not_take_naming_those_it_takes(api):
    before = api.state()
    for method, path, query in _operations(api):
        response = api.client.request(method, path, params={"bogus": "1"}, headers=bearer(api.admin))
        message = _error(response, 400, "invalid-request")
        takes = ", ".join(query) if query else "no query parameters"
        assert message == f"unknown query parameter 'bogus': this route takes {takes}", (method, path)
        for name in query:  # each documented parameter is one the route takes
            response = api.client.request(method, path, params={name: "1"}, headers=bearer(api.admin))
            assert "unknown query parameter" not in response.text, (method, path, name)
    assert api.state() == before


def test_a_parameter_given_twice_is_refused(api):
    csr = make_csr("dev-1")
    for method, path, query in _operations(api):
        for name in query:
            response = api.client.request(method, f"{path}?{name}=1&{name}=1", headers=bearer(api.admin))
            message = _error(response, 400, "invalid-request")
            assert message == f"query parameter '{name}' is given more than once: each takes one value"
    response = api.client.post(
        "/api/devices/dev-1/certificate?renew=true&renew=false",
        content=csr,
        headers={**bearer(api.factory_a), "Content-Type": "application/pkcs10"},
    )
    _error(response, 400, "invalid-request")
    assert api.certificate_count() == 0


def test_misspelt_parameters_of_the_reported_routes(api):
    assert api.post_csr("dev-1", make_csr("dev-1"), api.factory_a).status_code == 201
    admin = bearer(api.admin)
    # the CLI's option name, a snake_case filter: no longer the whole fleet
    for query, name in (("intermediate=nonexistent", "intermediate"), ("device_id=x", "device_id")):
        message = _error(api.client.get(f"/api/certificates?{query}", headers=admin), 400, "invalid-request")
        assert message.startswith(f"unknown query parameter '{name}': this route takes deviceId, intermediateId,")
    before = api.state()
    for params, name in (
        ({"renw": "true"}, "renw"),
        ({"intermediateid": "factory-a"}, "intermediateid"),
        ({"renew": "true", "Renew": "true"}, "Renew"),
    ):
        response = api.post_csr("dev-1", make_csr("dev-1"), api.factory_a, **params)
        message = _error(response, 400, "invalid-request")
        assert message == f"unknown query parameter '{name}': this route takes renew, intermediateId"
    lines = json.dumps({"deviceId": "dev-9", "csr": make_csr("dev-9").decode()}).encode()
    headers = {**bearer(api.factory_a), "Content-Type": "application/jsonl"}
    response = api.client.post("/api/batches?intermediateid=factory-a", content=lines, headers=headers)
    assert _error(response, 400, "invalid-request") == (
        "unknown query parameter 'intermediateid': this route takes intermediateId"
    )
    assert api.state() == before


def test_the_documented_parameters_keep_working(api):
    first = api.post_csr("dev-1", make_csr("dev-1"), api.factory_a, intermediateId="factory-a")
    assert first.status_code == 201 and first.json()["intermediateId"] == "factory-a"
    renewed = api.post_csr("dev-1", make_csr("dev-1"), api.factory_a, renew="true")
    assert renewed.status_code == 201 and renewed.json()["serialNumber"] != first.json()["serialNumber"]
    lines = json.dumps({"deviceId": "dev-2", "csr": make_csr("dev-2").decode()}).encode()
    headers = {**bearer(api.factory_a), "Content-Type": "application/jsonl"}
    batch = api.client.post("/api/batches?intermediateId=factory-a", content=lines, headers=headers)
    assert batch.status_code == 202 and batch.json()["intermediateId"] == "factory-a"
    listed = api.client.get(
        "/api/certificates?deviceId=dev-1&intermediateId=factory-a&status=active&limit=5", headers=bearer(api.admin)
    )
    assert [c["serialNumber"] for c in listed.json()["items"]] == [renewed.json()["serialNumber"]]
    assert api.client.get("/api/batches?limit=1", headers=bearer(api.factory_a)).status_code == 200


def test_who_may_not_call_a_route_learns_nothing_of_its_parameters(api):
    before = api.state()
    _error(api.client.get("/api/certificates?bogus=1"), 401, "missing-credentials")
    _error(api.client.post("/api/devices/dev-1/certificate?bogus=1", content=b"x"), 401, "missing-credentials")
    _error(api.client.post("/api/batches?bogus=1", content=b"x"), 401, "missing-credentials")
    _error(api.client.get("/api/keys?bogus=1", headers=bearer(api.factory_a)), 403, "admin-only")
    _error(api.client.get("/api/keys", headers={**bearer(api.factory_a), "Accept": X_PEM}), 403, "admin-only")
    _error(api.client.get("/api/ca/chain", headers={"Accept": "text/html"}), 401, "missing-credentials")
    # health is anyone's: its answer is the same with or without credentials
    assert _error(api.client.get("/api/health?bogus=1"), 400, "invalid-request").endswith("no query parameters")
    assert api.state() == before


# -- filters by the CLI's rules ------------------------------------------------------------------------


def _cli_refusal(check, value: str) -> tuple[str, str]:
    """What the CLI's option type says of `value` (its message and code), as `list-certificates` refuses it."""
    with pytest.raises(cli._RuleBroken) as refused:
        check(value)
    return str(refused.value), refused.value.code


@pytest.mark.parametrize(
    ("name", "check", "value"),
    [
        ("deviceId", cli.DEVICE_ID, "BAD ID"),
        ("deviceId", cli.DEVICE_ID, "Dev-1"),
        ("deviceId", cli.DEVICE_ID, "-dev"),
        ("deviceId", cli.DEVICE_ID, "d" * 65),
        ("deviceId", cli.DEVICE_ID, ""),
        ("intermediateId", cli.CA_ID, "Bad_X"),
        ("intermediateId", cli.CA_ID, "a" * 49),
        ("intermediateId", cli.CA_ID, ""),
    ],
)
def test_filters_are_checked_by_the_clis_rules(api, name, check, value):
    assert api.post_csr("dev-1", make_csr("dev-1"), api.factory_a).status_code == 201
    words, code = _cli_refusal(check, value)
    response = api.client.get("/api/certificates", params={name: value}, headers=bearer(api.admin))
    assert _error(response, 400, code) == f"{name}: {words}"


def test_two_broken_rules_are_named_together(api):
    response = api.client.get("/api/certificates?deviceId=BAD&limit=0", headers=bearer(api.admin))
    message = _error(response, 400, "invalid-request")
    assert message.startswith("deviceId: device ID 'BAD' is not a valid DPS registration ID") and "limit: " in message


# -- Accept --------------------------------------------------------------------------------------------


def _sign(api, accept: str | None, device: str = "dev-1"):
    headers = {**bearer(api.factory_a), "Content-Type": "application/pkcs10"}
    if accept is not None:
        headers["Accept"] = accept
    return api.client.post(f"/api/devices/{device}/certificate", content=make_csr(device), headers=headers)


@pytest.mark.parametrize(
    ("accept", "media"),
    [
        (PEM_CHAIN, PEM_CHAIN),
        (X_PEM, X_PEM),
        (f"application/json;q=0.5, {PEM_CHAIN}", PEM_CHAIN),
        (f"{X_PEM};q=0.5, application/json", "application/json"),
        (f"{PEM_CHAIN}, */*;q=0.1", PEM_CHAIN),
        (f"{PEM_CHAIN};q=0, */*", "application/json"),
        ("*/*", "application/json"),
        ("application/*", "application/json"),
        (BROWSER, "application/json"),
        (None, "application/json"),
    ],
)
def test_the_device_route_answers_in_the_type_asked_for(api, accept, media):
    response = _sign(api, accept)
    assert response.status_code == 201
    assert response.headers["content-type"].split(";")[0] == media
    if media == "application/json":
        device, intermediate = load_chain(response.json()["certificateChain"])
    else:
        device, intermediate = load_chain(response.text)
    check_device(device, intermediate, "dev-1")


@pytest.mark.parametrize("accept", ["text/html", "application/pkix-cert", f"{PEM_CHAIN};q=0, application/json;q=0"])
def test_an_accept_header_the_device_route_cannot_answer_is_406_and_signs_nothing(api, accept):
    message = _error(_sign(api, accept), 406, "not-acceptable")
    assert message.startswith(f"this route answers application/json, {PEM_CHAIN} or {X_PEM}; the Accept header")
    assert api.certificate_count() == 0


def test_root_and_chain_answer_pem_alike(api):
    root_pem = api.service.root().certificate_pem
    for path, who in (("/api/ca/root", api.admin), ("/api/ca/chain", api.factory_a)):
        for media in (X_PEM, PEM_CHAIN):
            response = api.client.get(path, headers={**bearer(who), "Accept": media})
            assert response.status_code == 200 and response.headers["content-type"].split(";")[0] == media
            certificates = load_chain(response.text)
            assert certificates[0] == load(root_pem)
        assert api.client.get(path, headers=bearer(who)).json()["root" if path.endswith("chain") else "id"]
        _error(api.client.get(path, headers={**bearer(who), "Accept": "text/plain"}), 406, "not-acceptable")
    root = api.client.get("/api/ca/root", headers={**bearer(api.admin), "Accept": X_PEM})
    assert root.text == root_pem


def test_a_json_route_refuses_a_pem_only_accept(api):
    headers = bearer(api.admin)
    message = _error(
        api.client.get("/api/ca/intermediates", headers={**headers, "Accept": X_PEM}), 406, "not-acceptable"
    )
    assert message == f"this route answers application/json; the Accept header ('{X_PEM}') allows none of them"
    for accept in ("*/*", "application/*", "application/json;q=0.2", BROWSER, "*"):
        assert api.client.get("/api/ca/intermediates", headers={**headers, "Accept": accept}).status_code == 200


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        ("", "application/json"),
        ("  ", "application/json"),
        ("*", "application/json"),
        ("nonsense", None),
        ("application/*;q=0", None),
        (f"{X_PEM};q=2", None),  # a q outside 0-1 is ignored, and with it the range
        (f"{X_PEM};q=x", None),
        (f"{X_PEM};q=nan", None),
        ("APPLICATION/X-PEM-FILE; charset=us-ascii", X_PEM),
        (f"{X_PEM}, {PEM_CHAIN}", X_PEM),  # equal: the one the header names first
        (f"{PEM_CHAIN}, {X_PEM}", PEM_CHAIN),
        (f"{X_PEM};q=0.5, {PEM_CHAIN};q=0.6", PEM_CHAIN),
        (f"application/*, {X_PEM}", X_PEM),  # named outright before a wildcard's match
        (f"application/*;q=0.3, {X_PEM};q=0", "application/json"),  # the most specific range decides
        (f"{X_PEM};q=0.5;foo=bar, application/json;q=0.4", X_PEM),
    ],
)
def test_negotiation(accept, chosen):
    assert negotiate(accept, ("application/json", PEM_CHAIN, X_PEM)) == chosen


@given(
    st.lists(
        st.sampled_from(["application/json", PEM_CHAIN, X_PEM, "*/*", "application/*", "text/html", "*", "x", ""])
        | st.text(max_size=20),
        max_size=5,
    ),
    st.lists(st.sampled_from(["", ";q=0", ";q=0.5", ";q=1", ";q=1.5", ";q=", ";level=1", "; Q=0.2"]), max_size=5),
)
def test_any_accept_header_chooses_an_offered_type_or_none(ranges, parameters_):
    accept = ", ".join(media + (parameters_[i] if i < len(parameters_) else "") for i, media in enumerate(ranges))
    offered = ("application/json", PEM_CHAIN, X_PEM)
    chosen = negotiate(accept, offered)
    assert chosen is None or chosen in offered
    if not accept.strip():
        assert chosen == "application/json"


# -- the OpenAPI document ------------------------------------------------------------------------------


def test_the_openapi_document_promises_400s_in_the_error_shape_never_422(api):
    document = api.client.get("/api/openapi.json").json()
    assert "HTTPValidationError" not in json.dumps(document)
    assert not {"HTTPValidationError", "ValidationError"} & set(document["components"]["schemas"])
    error = {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorResponse"}}}
    paths = document["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            responses = operation["responses"]
            assert "422" not in responses, (method, path)
            assert responses["400"]["content"] == error, (method, path)
            assert responses["406"]["content"] == error, (method, path)
    for path, method, status in (
        ("/api/devices/{deviceId}/certificate", "post", "201"),
        ("/api/ca/chain", "get", "200"),
        ("/api/ca/root", "get", "200"),
    ):
        assert {"application/json", PEM_CHAIN, X_PEM} <= set(paths[path][method]["responses"][status]["content"])
    listing = {p["name"]: p for p in paths["/api/certificates"]["get"]["parameters"]}
    assert listing["deviceId"]["schema"]["anyOf"][0]["maxLength"] == 64
    # what the document promises is what a route answers
    response = api.client.get("/api/certificates?limit=nope", headers=bearer(api.admin))
    _error(response, 400, "invalid-request")


def test_the_id_rules_as_parameters():
    assert parameters.device_id("dev-1") == "dev-1"
    assert parameters.ca_id("a" * parameters.MAX_CA_ID) == "a" * parameters.MAX_CA_ID
    with pytest.raises(parameters.InvalidParameter) as refused:
        parameters.ca_id("a" * (parameters.MAX_CA_ID + 1))
    assert refused.value.code == "invalid-ca-id"
    with pytest.raises(parameters.InvalidParameter) as refused:
        parameters.device_id(5)
    assert (refused.value.code, refused.value.problem) == ("invalid-request", "must be a string, not '5'")


@pytest.mark.parametrize(
    ("path", "query", "code"),
    [
        ("/api/devices/empty-1/certificate", "intermediateId=", "invalid-ca-id"),
        ("/api/devices/empty-1/certificate", "renew=", "invalid-request"),
        ("/api/devices/empty-1/certificate", "renew", "invalid-request"),
        ("/api/batches", "intermediateId=", "invalid-ca-id"),
    ],
)
def test_an_empty_query_value_is_refused_not_read_as_the_default(api, path, query, code):
    """`?intermediateId=` names no CA and `?renew=` says neither true nor false: a 400, as the inventory's
    filters answer, and nothing is signed or stored."""
    media = "application/pkcs10" if "devices" in path else "application/jsonl"
    body = make_csr("empty-1") if "devices" in path else json.dumps({"deviceId": "empty-1", "csr": "x"}).encode()
    response = api.client.post(f"{path}?{query}", content=body, headers={"Content-Type": media, **bearer(api.admin)})
    assert response.status_code == 400 and response.json()["error"]["code"] == code, response.text
    assert api.service.ledger.device_owners(["empty-1"]) == {} and api.service.batches().items == []
