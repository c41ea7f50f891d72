"""The HTTP API through FastAPI's TestClient: every route, the error shape, limits and content types."""

import json

import pytest
from cryptography.hazmat.primitives import serialization

from shared.errors import CaError
from shared.keys.local import LocalKeyStore
from shared.ledger.sqlite import SqliteLedger
from shared.parameters import CURSOR_PATTERN, MAX_DAYS, MAX_PAGE
from shared.service import DeviceCA

from .apiclient import bearer, make_api
from .certrules import (
    DEVICE_BUNDLE_FIELDS,
    check_device,
    check_intermediate,
    check_proof_of_possession,
    check_root,
    load,
    load_chain,
)
from .csrs import csr_asking_for_ca, device_key, make_csr
from .ledgers import everything_stored
from .test_csr_policy import REFUSED


@pytest.fixture
def api(service):
    return make_api(service)


def _error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}
    assert "\n" not in body["error"]["message"]
    if code:
        assert body["error"]["code"] == code, body
    return body["error"]


@pytest.mark.parametrize("media", ["application/pkcs10", "application/x-pem-file", "text/plain"])
def test_pem_body_gives_a_device_bundle(api, media):
    response = api.post_csr("dev-1", make_csr("dev-1"), api.factory_a, media)
    assert response.status_code == 201, response.text
    bundle = response.json()
    assert response.headers["location"] == f"/api/certificates/{bundle['serialNumber']}"
    assert set(bundle) == DEVICE_BUNDLE_FIELDS  # no "dps": DPS is offline
    device, intermediate = load_chain(bundle["certificateChain"])
    check_device(device, intermediate, "dev-1")
    check_intermediate(intermediate, load(api.service.root().certificate_pem))
    assert api.service.certificate(bundle["serialNumber"]).requested_by == "factory-one"


def test_der_and_json_bodies(api):
    der = make_csr("dev-der", encoding=serialization.Encoding.DER)
    assert api.post_csr("dev-der", der, api.factory_a).status_code == 201
    response = api.client.post(
        "/api/devices/dev-json/certificate", json={"csr": make_csr("dev-json").decode()}, headers=bearer(api.factory_a)
    )
    assert response.status_code == 201 and response.json()["deviceId"] == "dev-json"


def test_same_csr_again_is_200_with_the_same_certificate(api):
    csr = make_csr("dev-1")
    first = api.post_csr("dev-1", csr, api.factory_a)
    again = api.post_csr("dev-1", csr, api.factory_a)
    assert (first.status_code, again.status_code) == (201, 200)
    assert again.json() == first.json()
    assert api.certificate_count() == 1


def test_new_key_needs_renewal_and_one_key_serves_one_device(api):
    key = device_key()
    api.post_csr("dev-1", make_csr("dev-1", key=key), api.factory_a)
    _error(api.post_csr("dev-1", make_csr("dev-1"), api.factory_a), 409, "device-has-certificate")
    renewed = api.post_csr("dev-1", make_csr("dev-1"), api.factory_a, renew="true")
    assert renewed.status_code == 201
    renewed_json = api.client.post(
        "/api/devices/dev-1/certificate",
        json={"csr": make_csr("dev-1").decode(), "renew": True},
        headers=bearer(api.factory_a),
    )
    assert renewed_json.status_code == 201
    _error(api.post_csr("dev-2", make_csr("dev-2", key=key), api.factory_a), 409, "key-in-use")


def test_pem_chain_on_request(api):
    response = api.client.post(
        "/api/devices/dev-1/certificate",
        content=make_csr("dev-1"),
        headers={**bearer(api.factory_a), "Content-Type": "application/pkcs10", "Accept": "application/x-pem-file"},
    )
    assert response.status_code == 201
    assert response.headers["content-type"].startswith("application/x-pem-file")
    device, intermediate = load_chain(response.text)
    check_device(device, intermediate, "dev-1")


@pytest.mark.parametrize(("case", "make", "device_id", "code", "words"), REFUSED, ids=[r[0] for r in REFUSED])
def test_refused_csrs_over_http(api, case, make, device_id, code, words):
    before = api.state()
    error = _error(api.post_csr(device_id, make(), api.factory_a), 400, code)
    assert words in error["message"]
    assert api.state() == before


def test_requested_extensions_are_ignored_over_http(api):
    response = api.post_csr("dev-ca", csr_asking_for_ca("dev-ca"), api.factory_a)
    device, intermediate = load_chain(response.json()["certificateChain"])
    check_device(device, intermediate, "dev-ca")


def test_body_over_the_cap_is_413(api):
    before = api.state()
    _error(api.post_csr("dev-1", b"A" * (8 * 1024 + 1), api.factory_a, "text/plain"), 413, "body-too-large")
    big_json = {"name": "x" * (64 * 1024), "intermediates": ["factory-a"]}
    _error(api.client.post("/api/factories", json=big_json, headers=bearer(api.admin)), 413)

    def chunks(total: int):  # no Content-Length: the cap is counted as the body streams in
        for _ in range(total // 1024):
            yield b"A" * 1024

    headers = {**bearer(api.factory_a), "Content-Type": "text/plain"}
    streamed = api.client.post("/api/devices/dev-1/certificate", content=chunks(9 * 1024), headers=headers)
    assert "content-length" not in streamed.request.headers
    _error(streamed, 413, "body-too-large")
    headers = {**bearer(api.admin), "Content-Type": "application/json"}
    _error(api.client.post("/api/factories", content=chunks(65 * 1024), headers=headers), 413, "body-too-large")
    assert api.state() == before


def test_unknown_content_types_are_415(api):
    _error(api.post_csr("dev-1", make_csr("dev-1"), api.factory_a, "application/xml"), 415, "unsupported-media-type")
    response = api.client.post(
        "/api/devices/dev-1/certificate", content=make_csr("dev-1"), headers=bearer(api.factory_a)
    )
    _error(response, 415)
    response = api.client.post(
        "/api/factories",
        content=json.dumps({"name": "f", "intermediates": ["factory-a"]}),
        headers={**bearer(api.admin), "Content-Type": "text/plain"},
    )
    _error(response, 415)
    assert api.certificate_count() == 0


def test_bad_json_and_bad_parameters_are_400(api):
    headers = {**bearer(api.factory_a), "Content-Type": "application/json"}
    not_json = _error(api.client.post("/api/devices/dev-1/certificate", content=b"{not json", headers=headers), 400)
    assert "PEM" not in not_json["message"]
    for pem in (
        make_csr("dev-1"),
        b"\xef\xbb\xbf\r\n" + make_csr("dev-1"),
    ):  # a PEM CSR sent as JSON: say how to send it
        refused = api.client.post("/api/devices/dev-1/certificate", content=pem, headers=headers)
        assert _error(refused, 400, "invalid-request")["message"] == (
            "the body is PEM, not JSON: send a PEM CSR as application/pkcs10 (or application/x-pem-file), or JSON "
            '{"csr": "<PEM>"} as application/json'
        )
    _error(api.client.post("/api/devices/dev-1/certificate", json={"csr": 5}, headers=headers), 400)
    _error(api.client.post("/api/devices/dev-1/certificate", json={"csr": "x", "evil": 1}, headers=headers), 400)
    _error(api.client.get("/api/certificates?limit=0", headers=bearer(api.admin)), 400, "invalid-request")
    _error(api.client.get("/api/certificates?status=lost", headers=bearer(api.admin)), 400)
    _error(api.client.post("/api/ca/intermediates", json={"days": -1}, headers=bearer(api.admin)), 400)
    _error(api.client.post("/api/ca/intermediates", json={"id": "Bad ID"}, headers=bearer(api.admin)), 400)
    _error(api.client.get("/api/certificates/zz-not-hex", headers=bearer(api.admin)), 400, "invalid-serial")
    _error(api.post_csr("Dev 1", make_csr("dev-1"), api.factory_a), 400, "invalid-device-id")


def test_unknown_routes_and_methods(api):
    _error(api.client.get("/api/nothing-here"), 404)
    _error(api.client.delete("/api/health"), 405)


def test_credentials(api):
    csr = make_csr("dev-1")
    missing = api.post_csr("dev-1", csr, None)
    _error(missing, 401, "missing-credentials")
    assert missing.headers["www-authenticate"] == "Bearer"
    _error(api.post_csr("dev-1", csr, "dca_0000000000000000_" + "A" * 43), 401, "invalid-api-key")
    _error(api.post_csr("dev-1", csr, "not-even-a-key"), 401, "invalid-api-key")
    # a real key's ID with another secret: the ID alone never authenticates
    forged = api.factory_a[:-43] + ("B" if api.factory_a[-43] != "B" else "C") + api.factory_a[-42:]
    _error(api.post_csr("dev-1", csr, forged), 401, "invalid-api-key")
    _error(api.post_csr("dev-1", csr, api.revoked), 401, "revoked-api-key")
    response = api.client.post(
        "/api/devices/dev-1/certificate",
        content=csr,
        headers={"x-api-key": api.factory_a, "Content-Type": "application/pkcs10"},
    )
    assert response.status_code == 201
    for scheme in ("Basic", "Token", "Bearer\t", "bearerx"):  # only the bearer scheme carries a key
        refused = api.client.get("/api/ca/root", headers={"Authorization": f"{scheme} {api.admin}"})
        assert "does not carry an API key" in _error(refused, 401, "unsupported-credentials")["message"]
    for empty in ("Bearer ", "Bearer", "bearer \t "):  # 'Bearer $KEY' with KEY unset
        refused = api.client.get("/api/ca/root", headers={"Authorization": empty})
        assert _error(refused, 401, "unsupported-credentials")["message"] == (
            "the Authorization header is not usable: its Bearer key is empty; send 'Authorization: Bearer <key>'"
        )
    _error(api.client.get("/api/ca/root", headers=bearer(api.factory_a)), 403, "admin-only")
    _error(api.post_csr("dev-2", make_csr("dev-2"), api.factory_a, intermediateId="factory-b"), 403)


def test_factory_signs_with_its_own_intermediate_by_default(api):
    a = api.post_csr("dev-a", make_csr("dev-a"), api.factory_a).json()
    b = api.post_csr("dev-b", make_csr("dev-b"), api.factory_b).json()
    assert (a["intermediateId"], b["intermediateId"]) == ("factory-a", "factory-b")
    admin = api.post_csr("dev-c", make_csr("dev-c"), api.admin).json()
    assert admin["intermediateId"] == "factory-b"  # the newest active


def test_factory_reads_only_its_own_certificates(api):
    a = api.post_csr("dev-a", make_csr("dev-a"), api.factory_a).json()["serialNumber"]
    b = api.post_csr("dev-b", make_csr("dev-b"), api.factory_b).json()["serialNumber"]
    listed = api.client.get("/api/certificates", headers=bearer(api.factory_a)).json()["items"]
    assert [c["serialNumber"] for c in listed] == [a]
    assert api.client.get(f"/api/certificates/{a}", headers=bearer(api.factory_a)).status_code == 200
    _error(api.client.get(f"/api/certificates/{b}", headers=bearer(api.factory_a)), 404)
    everything = api.client.get("/api/certificates", headers=bearer(api.admin)).json()["items"]
    assert {c["serialNumber"] for c in everything} == {a, b}


def test_a_factory_cannot_take_over_another_factorys_device(api):
    csr = make_csr("dev-1")
    serial = api.post_csr("dev-1", csr, api.factory_a).json()["serialNumber"]
    refused = _error(api.post_csr("dev-1", csr, api.factory_b), 403, "device-owned-by-another-factory")
    assert serial not in refused["message"] and "factory-a" not in refused["message"]


def test_admin_routes(api):
    admin = bearer(api.admin)
    root = api.client.get("/api/ca/root", headers=admin).json()
    check_root(load(root["certificate"]))
    _error(api.client.post("/api/ca/root", headers=admin), 409, "root-exists")
    proof = api.client.post("/api/ca/root/proof-of-possession", json={"verificationCode": "ABCDEF12"}, headers=admin)
    assert proof.status_code == 200 and proof.json()["verificationCode"] == "ABCDEF12"
    check_proof_of_possession(load(proof.json()["certificate"]), load(root["certificate"]), "ABCDEF12")
    created = api.client.post("/api/ca/intermediates", json={"id": "line-3", "curve": "P-384"}, headers=admin)
    assert created.status_code == 201 and created.json()["curve"] == "P-384"
    check_intermediate(load(created.json()["certificate"]), load(root["certificate"]))
    assert created.json()["dps"]["mode"] == "offline" and created.json()["warnings"]
    assert created.json()["default"] is True  # the newest active intermediate signs when none is named
    assert [i["id"] for i in api.client.get("/api/ca/intermediates", headers=admin).json()] == [
        "factory-a",
        "factory-b",
        "line-3",
    ]
    assert api.client.get("/api/ca/intermediates/line-3", headers=admin).json()["serialNumber"]
    _error(api.client.get("/api/ca/intermediates/nope", headers=admin), 404, "intermediate-not-found")
    disabled = api.client.post("/api/ca/intermediates/line-3/disable", headers=admin).json()
    assert disabled["status"] == "disabled" and disabled["default"] is False
    _error(api.post_csr("dev-1", make_csr("dev-1"), api.admin, intermediateId="line-3"), 409, "intermediate-disabled")
    enabled = api.client.post("/api/ca/intermediates/line-3/enable", headers=admin).json()
    assert enabled["status"] == "active" and enabled["default"] is True
    assert api.post_csr("dev-1", make_csr("dev-1"), api.admin, intermediateId="line-3").status_code == 201


def test_revoke(api):
    serial = api.post_csr("dev-1", make_csr("dev-1"), api.factory_a).json()["serialNumber"]
    response = api.client.post(
        f"/api/certificates/{serial}/revoke", json={"reason": "keyCompromise"}, headers=bearer(api.admin)
    )
    assert response.status_code == 200
    assert response.json()["status"] == "revoked" and response.json()["dps"]["mode"] == "offline"
    listed = api.client.get("/api/certificates?status=revoked", headers=bearer(api.admin)).json()["items"]
    assert [c["serialNumber"] for c in listed] == [serial]


def test_factories_and_keys(api):
    admin = bearer(api.admin)
    created = api.client.post("/api/factories", json={"name": "acme", "intermediates": ["factory-b"]}, headers=admin)
    assert created.status_code == 201
    key = created.json()["apiKey"]
    assert api.post_csr("dev-acme", make_csr("dev-acme"), key).json()["intermediateId"] == "factory-b"
    _error(api.client.post("/api/factories", json={"name": "acme", "intermediates": ["factory-b"]}, headers=admin), 409)
    _error(
        api.client.post("/api/factories", json={"name": "ghost", "intermediates": ["nope"]}, headers=admin),
        404,
        "intermediate-not-found",
    )
    keys = api.client.get("/api/keys", headers=admin).json()
    assert created.json()["keyId"] in {k["id"] for k in keys}
    assert all("apiKey" not in k and "secretSha256" not in k for k in keys)
    revoked = api.client.post(f"/api/keys/{created.json()['keyId']}/revoke", headers=admin)
    assert revoked.status_code == 200 and revoked.json()["revokedAt"]
    _error(api.post_csr("dev-acme-2", make_csr("dev-acme-2"), key), 401, "revoked-api-key")


def test_an_api_key_pasted_where_an_id_belongs_is_never_repeated_with_its_secret(api):
    """A whole key sent as a key ID, a serial or a device ID: the refusal names the key by its ID only
    ("dca_<id>_<secret>"), since answers end up in logs; and a refusal repeats at most 1,000 characters
    of what it names, however long that was."""
    admin = bearer(api.admin)
    key_id, secret = api.admin.split("_")[1], api.admin.split("_", 2)[2]
    for path in (f"/api/keys/{api.admin}/revoke", f"/api/certificates/{api.factory_a}/revoke"):
        response = api.client.post(path, headers=admin)
        assert response.status_code in (400, 404) and secret not in response.text, response.text
    answer = api.client.post(f"/api/keys/{api.admin}/revoke", headers=admin).json()["error"]["message"]
    assert f"dca_{key_id}_<secret>" in answer
    device = api.post_csr(api.factory_a, make_csr("pasted"), api.factory_a)
    assert device.status_code == 400 and api.factory_a.split("_", 2)[2] not in device.text
    for path in (f"/api/certificates/{secret}", f"/api/batches/{api.admin.replace('_', '-')}"):  # its secret alone
        response = api.client.get(path, headers=admin)
        assert response.status_code in (400, 404) and secret[:16] not in response.text, response.text
    cut = api.client.get("/api/certificates", params={"status": api.admin}, headers=admin)  # cut to 40 characters
    assert cut.status_code == 400 and secret[:16] not in cut.text, cut.text
    long_id = "d" * 30_000
    refused = api.post_csr(long_id, make_csr("long"), api.factory_a).json()["error"]["message"]
    assert len(refused) == 1_000 and refused.endswith("…") and refused.startswith("device ID")


def test_a_factory_rebound_to_a_new_intermediate_keeps_its_key(api):
    admin = bearer(api.admin)
    api.client.post("/api/ca/intermediates", json={"id": "line-2"}, headers=admin)
    listed = api.client.get("/api/factories", headers=admin).json()
    assert [(f["id"], f["intermediates"]) for f in listed] == [
        ("factory-one", ["factory-a"]),
        ("factory-two", ["factory-b"]),
    ]
    bound = api.client.put(
        "/api/factories/factory-one/intermediates", json={"intermediates": ["line-2"]}, headers=admin
    )
    assert bound.status_code == 200 and bound.json()["intermediates"] == ["line-2"]
    signed = api.post_csr("dev-rebound", make_csr("dev-rebound"), api.factory_a)
    assert signed.status_code == 201 and signed.json()["intermediateId"] == "line-2"
    refused = api.post_csr("dev-old-line", make_csr("dev-old-line"), api.factory_a, intermediateId="factory-a")
    _error(refused, 403, "intermediate-not-allowed")

    def bind(name: str, intermediates: list[str]):
        return api.client.put(
            f"/api/factories/{name}/intermediates", json={"intermediates": intermediates}, headers=admin
        )

    before = api.state()
    _error(bind("nobody", ["line-2"]), 404, "principal-not-found")
    _error(bind("factory-one", ["nope"]), 404, "intermediate-not-found")
    _error(bind("admin", ["line-2"]), 400, "not-a-factory")
    _error(bind("factory-one", []), 400, "invalid-request")
    assert api.state() == before


def test_an_admin_lists_what_one_factory_asked_for_and_a_factory_only_its_own(api):
    assert api.post_csr("by-one", make_csr("by-one"), api.factory_a).status_code == 201
    assert api.post_csr("by-two", make_csr("by-two"), api.factory_b).status_code == 201
    assert api.post_csr("by-admin", make_csr("by-admin"), api.admin).status_code == 201

    def devices(key: str, **query: str) -> list[str]:
        response = api.client.get("/api/certificates", params=query, headers=bearer(key))
        assert response.status_code == 200, response.text
        return [item["deviceId"] for item in response.json()["items"]]

    assert devices(api.admin, requestedBy="factory-two") == ["by-two"]
    assert devices(api.admin, requestedBy="factory-one", deviceId="by-two") == []
    assert sorted(devices(api.admin)) == ["by-admin", "by-one", "by-two"]
    assert devices(api.factory_a, requestedBy="factory-one") == devices(api.factory_a) == ["by-one"]
    other = api.client.get("/api/certificates", params={"requestedBy": "factory-two"}, headers=bearer(api.factory_a))
    assert _error(other, 403, "forbidden")["message"] == "a factory lists only the certificates it asked for"
    by_cli = api.service.sign_csr(make_csr("by-cli"), "by-cli", requested_by="cli:ops")  # as the CLI records it
    assert by_cli.record.requested_by == "cli:ops" and devices(api.admin, requestedBy="cli:ops") == ["by-cli"]
    api.service.sign_csr(make_csr("by-john"), "by-john", requested_by="cli:John Smith")  # a login name with a space
    assert devices(api.admin, requestedBy="cli:John Smith") == ["by-john"]
    for odd in ("cli:", "cli: ", "cli:bell\u0007", "cli:" + "x" * 300):
        refused = api.client.get("/api/certificates", params={"requestedBy": odd}, headers=bearer(api.admin))
        assert refused.status_code == 400, (odd, refused.text)
    bad = api.client.get("/api/certificates", params={"requestedBy": "Factory Two"}, headers=bearer(api.admin))
    assert _error(bad, 400, "invalid-principal-name")["message"].startswith("requestedBy: principal name 'Factory")


def test_two_credential_headers_are_refused_whichever_they_are(api):
    """Two Authorization headers, two x-api-key headers, or one of each: which one a proxy or another
    server would take differs, so the request is refused (401) rather than taking the first."""
    good, other = f"Bearer {api.admin}", f"Bearer {api.factory_a}"
    for headers in (
        [("authorization", good), ("authorization", other)],
        [("authorization", good), ("authorization", good)],
        [("x-api-key", api.admin), ("x-api-key", "dca_nothing")],
        [("authorization", good), ("x-api-key", api.factory_a)],
    ):
        response = api.client.get("/api/certificates", headers=headers)
        assert response.status_code == 401, (headers, response.text)
        assert response.json()["error"] == {
            "code": "ambiguous-credentials",
            "message": "2 credential headers: send one API key, as 'Authorization: Bearer <key>' or 'x-api-key: <key>'",
        }
    assert api.client.get("/api/certificates", headers={"authorization": good}).status_code == 200


def test_a_bearer_key_is_what_follows_the_first_space(api):
    """The scheme ends at the first space: spaces before the key are not part of the scheme, and what
    follows is the key whole (a key with words after it is no key)."""
    accepted = api.client.get("/api/ca/root", headers={"Authorization": f"Bearer  {api.admin}"})
    assert accepted.status_code == 200, accepted.text
    trailing = {"Authorization": f"Bearer {api.admin} trailing"}
    _error(api.client.get("/api/ca/root", headers=trailing), 401, "invalid-api-key")
    both = {"Authorization": f"Bearer {api.factory_a} trailing", "x-api-key": api.admin}
    _error(api.client.get("/api/ca/root", headers=both), 401, "ambiguous-credentials")  # never the good one


def test_an_api_key_authenticates_its_principal_as_an_api_key_caller(api):
    principals = api.service.principals
    factory = principals.authenticate(api.factory_a)
    assert (factory.id, factory.role, factory.intermediates, factory.via) == (
        "factory-one",
        "factory",
        ("factory-a",),
        "api-key",
    )
    admin = principals.authenticate(api.admin)
    assert (admin.id, admin.role, admin.intermediates, admin.via) == ("admin", "admin", None, "api-key")


def test_another_admin_key_is_for_the_same_admin_and_a_factory_never_becomes_one(api):
    principals = api.service.principals
    second = principals.create_admin_key()
    assert second.principal.id == "admin" and second.principal.role == "admin"
    assert principals.authenticate(second.secret).is_admin and principals.authenticate(api.admin).is_admin
    assert [p.id for p in api.service.ledger.list_principals()].count("admin") == 1
    before = api.state()
    with pytest.raises(CaError) as refused:
        principals.create_admin_key("factory-one")
    assert refused.value.code == "not-an-admin" and "'factory-one' is a factory" in refused.value.message
    assert api.state() == before
    assert not principals.authenticate(api.factory_a).is_admin


def test_every_operation_but_health_asks_for_an_api_key(api):
    document = api.client.get("/api/openapi.json").json()
    schemes = document["components"]["securitySchemes"]
    assert set(schemes) == {"HTTPBearer", "APIKeyHeader"}
    assert document["components"]["schemas"]  # the models' schemas are kept beside the schemes
    operations = [(path, method, op) for path, ops in document["paths"].items() for method, op in ops.items()]
    assert len(operations) > 10
    for path, method, operation in operations:
        expected = None if path == "/api/health" else [{"HTTPBearer": []}, {"APIKeyHeader": []}]
        assert operation.get("security") == expected, (method, path)


def test_api_keys_are_stored_only_as_hashes(api):
    stored = everything_stored(api.service.ledger)
    for key in (api.admin, api.factory_a, api.factory_b):
        assert key.encode() not in stored
        assert key.split("_", 2)[2].encode() not in stored


def test_health_and_openapi(api):
    health = api.client.get("/api/health")
    assert (health.status_code, health.json()) == (200, {"status": "ok"})  # anyone: the status only
    for key in (api.factory_a, api.admin):
        health = api.client.get("/api/health", headers=bearer(key))
        assert health.status_code == 200
        assert health.json() == {
            "status": "ok",
            "backends": {"keys": "local", "ledger": api.service.ledger.backend, "dps": "offline"},
            "dpsConfigured": False,
            "auth": "apikey",
        }
    assert api.client.get("/api/health", headers=bearer(api.revoked)).json() == {"status": "ok"}
    document = api.client.get("/api/openapi.json").json()
    paths = document["paths"]
    for path in (
        "/api/devices/{deviceId}/certificate",
        "/api/ca/root",
        "/api/ca/root/proof-of-possession",
        "/api/ca/intermediates",
        "/api/ca/intermediates/{intermediateId}",
        "/api/ca/intermediates/{intermediateId}/disable",
        "/api/ca/intermediates/{intermediateId}/enable",
        "/api/certificates",
        "/api/certificates/{serial}",
        "/api/certificates/{serial}/revoke",
        "/api/factories",
        "/api/health",
    ):
        assert path in paths, path
    body = paths["/api/devices/{deviceId}/certificate"]["post"]["requestBody"]["content"]
    assert {"application/pkcs10", "application/x-pem-file", "text/plain", "application/json"} <= set(body)
    assert {"HTTPBearer", "APIKeyHeader"} <= set(document["components"]["securitySchemes"])
    # the parameters' bounds in the keywords OpenAPI tools read (JSON Schema's), not pydantic's own names
    listing = {p["name"]: p["schema"] for p in paths["/api/certificates"]["get"]["parameters"]}
    assert (listing["limit"]["minimum"], listing["limit"]["maximum"]) == (1, MAX_PAGE)
    assert {"exclusiveMinimum": 0, "maximum": MAX_DAYS}.items() <= listing["expiringWithinDays"]["anyOf"][0].items()
    assert listing["cursor"]["anyOf"][0]["pattern"] == CURSOR_PATTERN
    assert [key for key in ('"ge":', '"le":', '"gt":', '"lt":') if key in json.dumps(document)] == []
    docs = api.client.get("/api/docs/start.js")
    assert docs.status_code == 200 and "/api/openapi.json" in docs.text


def test_busy_ledger_is_503_with_retry_after_and_nothing_returned(embedded_service, tmp_path):
    """A SQLite ledger that cannot commit (another process holds the write lock): 503, and no certificate.
    (Table Storage that keeps failing: tests/test_ledger_tables.py.)"""
    service = embedded_service
    home = service.settings.pki_home
    busy = DeviceCA(
        keys=LocalKeyStore(home),
        ledger=SqliteLedger(home / "ledger.sqlite3", busy_timeout_seconds=0.05),
        dps=service.dps,
        settings=service.settings,
    )
    api = make_api(busy)
    import sqlite3

    blocker = sqlite3.connect(home / "ledger.sqlite3", isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        response = api.post_csr("dev-1", make_csr("dev-1"), api.factory_a)
    finally:
        blocker.execute("ROLLBACK")
    _error(response, 503, "ledger-busy")
    assert response.headers["retry-after"].isdigit()
    assert "BEGIN" not in response.text and str(home) not in response.text
    assert api.certificate_count() == 0
    assert api.post_csr("dev-1", make_csr("dev-1"), api.factory_a).status_code == 201
