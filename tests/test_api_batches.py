"""The batch routes through FastAPI's TestClient: JSON and JSON Lines, 202 with every item stored, results
paged, a malformed request a 400, the body cap, and who may read a batch."""

import json

import pytest

from shared.api.batches import BATCH_BODY_LIMIT
from shared.service.batches import MAX_BATCH_ITEMS

from .apiclient import bearer, deliver_chunks, make_api
from .certrules import DEVICE_BUNDLE_FIELDS, check_device, load_chain
from .csrs import make_csr


@pytest.fixture
def api(service):
    return make_api(service)


def _items(prefix: str, count: int) -> list[dict]:
    return [{"deviceId": f"{prefix}-{n}", "csr": make_csr(f"{prefix}-{n}").decode()} for n in range(count)]


def _submit(api, key, body, media="application/json", **params):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    return api.client.post(
        "/api/batches", content=content, headers={"Content-Type": media, **bearer(key)}, params=params
    )


def _error(response, status: int, code: str) -> str:
    assert response.status_code == status, response.text
    assert set(response.json()) == {"error"} and response.json()["error"]["code"] == code, response.text
    return response.json()["error"]["message"]


def test_a_batch_through_the_api(api):
    items = _items("api", 5)
    response = _submit(api, api.factory_a, {"items": items})
    assert response.status_code == 202, response.text
    batch = response.json()
    assert response.headers["location"] == f"/api/batches/{batch['id']}"
    assert batch["status"] == "queued" and batch["counts"] == {"total": 5, "pending": 5, "issued": 0, "failed": 0}
    assert batch["requestedBy"] == "factory-one" and batch["intermediateId"] == "factory-a"
    assert api.service.batch(batch["id"]).pending == 5  # every item is stored before the 202
    assert api.certificate_count() == 0

    pending = api.client.get(f"/api/batches/{batch['id']}", headers=bearer(api.factory_a)).json()
    assert [r["status"] for r in pending["results"]] == ["pending"] * 5
    assert deliver_chunks(api.service) == 1

    page = api.client.get(f"/api/batches/{batch['id']}", params={"limit": 3}, headers=bearer(api.factory_a)).json()
    assert page["status"] == "done" and page["counts"]["issued"] == 5 and page["finishedAt"]
    assert page["nextCursor"] == "3" and [r["index"] for r in page["results"]] == [0, 1, 2]
    rest = api.client.get(
        f"/api/batches/{batch['id']}", params={"limit": 3, "cursor": "3"}, headers=bearer(api.factory_a)
    ).json()
    assert rest["nextCursor"] is None and [r["index"] for r in rest["results"]] == [3, 4]
    for result, item in zip(page["results"] + rest["results"], items, strict=True):
        assert result["status"] == "issued" and result["created"] is True and "error" not in result
        assert set(result["bundle"]) == DEVICE_BUNDLE_FIELDS
        device, intermediate = load_chain(result["bundle"]["certificateChain"])
        check_device(device, intermediate, item["deviceId"])
        assert api.service.certificate(result["bundle"]["serialNumber"]).device_id == item["deviceId"]
    assert api.certificate_count() == 5


def test_json_lines_with_a_bad_line_fail_that_item_alone(api):
    lines = [json.dumps(item) for item in _items("lines", 2)]
    body = "\n".join([lines[0], "{not json", "", lines[1], '["an", "array"]']).encode() + b"\n"
    response = _submit(api, api.admin, body, "application/jsonl", intermediateId="factory-b")
    assert response.status_code == 202, response.text
    batch = response.json()
    assert batch["intermediateId"] == "factory-b" and batch["counts"]["failed"] == 2
    deliver_chunks(api.service)
    done = api.client.get(f"/api/batches/{batch['id']}", headers=bearer(api.admin)).json()
    assert done["status"] == "done-with-failures"
    assert [r["status"] for r in done["results"]] == ["issued", "failed", "issued", "failed"]
    assert done["results"][1]["error"]["code"] == "invalid-item"
    assert done["results"][2]["bundle"]["intermediateId"] == "factory-b"


_GOOD = json.dumps({"deviceId": "good-line", "csr": make_csr("good-line").decode()})
_OVER = json.dumps({"deviceId": "x", "csr": "y"})


@pytest.mark.parametrize(
    ("body", "status", "code", "index", "message"),
    [
        (
            "{not json\n" + _GOOD + "\n",
            202,
            "invalid-item",
            0,
            "line 1 is not JSON: Expecting property name enclosed in double quotes (column 2)",
        ),
        (
            f"{_GOOD}\n{_GOOD}\n{{not json\n",
            202,
            "invalid-item",
            2,
            "line 3 is not JSON: Expecting property name enclosed in double quotes (column 2)",
        ),
        (
            "\n\n{bad\n",
            202,
            "invalid-item",
            0,
            "line 3 is not JSON: Expecting property name enclosed in double quotes (column 2)",
        ),
        (
            f'{_GOOD}\r\n\r\n{{"deviceId": "crlf"\r\n{_GOOD}\r\n',
            202,
            "invalid-item",
            1,
            "line 3 is not JSON: Expecting ',' delimiter (column 20)",
        ),
        (
            f'{_GOOD}\n["an", "array"]\n',
            202,
            "invalid-item",
            1,
            'line 2 is JSON but not an object (an array); a line holds one {"deviceId", "csr"}',
        ),
        (
            "\t\r\nnull",
            202,
            "invalid-item",
            0,
            'line 2 is JSON but not an object (null); a line holds one {"deviceId", "csr"}',
        ),
        (
            f'{_GOOD}\n\n{{"deviceId": "no-csr"}}\n',
            202,
            "invalid-item",
            1,
            "line 3: csr is missing or not a string (PEM)",
        ),
        ('\n{"csr": "x"}', 202, "invalid-item", 0, "line 2: deviceId is missing or not a string"),
        (f"{_GOOD}\n\xff\n".encode("latin-1"), 202, "invalid-item", 1, "line 2 is not UTF-8 text"),
        (  # a CSR's PEM in Latin-1: only that line
            f'\n{{"deviceId": "caf\xe9", "csr": "x"}}\r\n{_GOOD}'.encode("latin-1"),
            202,
            "invalid-item",
            0,
            "line 2 is not UTF-8 text",
        ),
        (
            "\n\n" + "\n".join([_OVER] * (MAX_BATCH_ITEMS + 1)),
            400,
            "too-many-items",
            None,
            f"a batch holds at most {MAX_BATCH_ITEMS} items, not {MAX_BATCH_ITEMS + 1}: "
            f"the first item over is on line {MAX_BATCH_ITEMS + 3}",
        ),
    ],
    ids=[
        "not-json-on-line-1",
        "not-json-on-line-3",
        "blank-lines-before-it",
        "crlf",
        "an-array",
        "null-after-whitespace",
        "no-csr",
        "no-device-id",
        "not-utf-8",
        "latin-1-line-then-crlf",
        "too-many",
    ],
)
def test_every_error_about_a_json_lines_body_names_its_line(api, body, status, code, index, message):
    """Lines are numbered as the client's file has them (1-based, blank lines counted); a bad line fails its
    item alone, whose index counts the lines that are not blank (README "Batches")."""
    content = body if isinstance(body, bytes) else body.encode()
    response = _submit(api, api.factory_a, content, "application/jsonl")
    if status != 202:
        assert _error(response, status, code) == message
        return
    assert response.status_code == 202, response.text
    results = api.client.get(f"/api/batches/{response.json()['id']}", headers=bearer(api.factory_a)).json()["results"]
    (failed,) = [result for result in results if result["status"] == "failed"]
    assert failed["index"] == index and failed["error"] == {"code": code, "message": message}


def test_a_json_body_keeps_naming_items_by_index(api):
    good = json.loads(_GOOD)
    response = _submit(api, api.factory_a, {"items": [good, ["an", "array"], {"deviceId": "no-csr"}]})
    assert response.status_code == 202, response.text
    results = api.client.get(f"/api/batches/{response.json()['id']}", headers=bearer(api.factory_a)).json()["results"]
    assert [r["error"]["message"] for r in results if r["status"] == "failed"] == [
        "item 1: an item must be an object with deviceId and csr",
        "item 2: csr is missing or not a string (PEM)",
    ]


@pytest.mark.parametrize("media", ["application/json", "application/jsonl"])
def test_a_device_id_with_a_lone_surrogate_fails_its_item_alone(api, media):
    """JSON's escapes can spell a lone surrogate ("\\ud800"), which is no Unicode text: no store and no JSON
    answer can hold it as UTF-8. The item fails, the others are signed, and the results stay readable."""
    items = [{"deviceId": "\ud800", "csr": json.loads(_GOOD)["csr"]}, *_items("beside-surrogate", 1)]
    body = json.dumps({"items": items}) if media == "application/json" else "\n".join(json.dumps(i) for i in items)
    response = _submit(api, api.factory_a, body.encode(), media)
    assert response.status_code == 202, response.text
    deliver_chunks(api.service)
    batch = api.client.get(f"/api/batches/{response.json()['id']}", headers=bearer(api.factory_a))
    assert batch.status_code == 200, batch.text
    failed, issued = batch.json()["results"]
    assert (failed["deviceId"], failed["status"], issued["deviceId"], issued["status"]) == (
        "",
        "failed",
        "beside-surrogate-0",
        "issued",
    )
    which = "item 0" if media == "application/json" else "line 1"
    assert failed["error"] == {
        "code": "invalid-item",
        "message": f"{which}: deviceId is not Unicode text: it holds a lone surrogate (such as \\ud800), "
        "which UTF-8 cannot encode",
    }


def test_an_api_key_pasted_into_a_batch_is_never_stored_or_answered_with_its_secret(api):
    """A whole key, or its secret alone, sent as a device ID or as a field name: each item fails alone, and
    neither the stored item nor the batch's results repeat the secret."""
    secret = api.factory_b.split("_", 2)[2]
    csr = json.loads(_GOOD)["csr"]
    items = [{"deviceId": api.factory_b, "csr": csr}, {"deviceId": secret, "csr": csr}, {secret: 1, "csr": csr}]
    response = _submit(api, api.factory_a, {"items": items})
    assert response.status_code == 202, response.text
    deliver_chunks(api.service)
    results = api.client.get(f"/api/batches/{response.json()['id']}", headers=bearer(api.factory_a))
    assert results.status_code == 200 and [r["status"] for r in results.json()["results"]] == ["failed"] * 3
    assert secret[:16] not in results.text and secret[-16:] not in results.text, results.text
    stored = api.service.ledger.batch_items(response.json()["id"], 0, 10)
    assert not any(secret[:16] in repr(item) or secret[-16:] in repr(item) for item in stored)


def test_json_lines_sent_as_json_is_refused_saying_how_to_send_it(api):
    body = "\n".join(json.dumps(item) for item in _items("as-json", 2)).encode()
    message = _error(_submit(api, api.factory_a, body, "application/json"), 400, "invalid-request")
    assert message.endswith("; JSON Lines (one item a line) is sent as application/jsonl"), message


def test_files_joined_with_their_byte_order_marks_are_read_whole(api):
    """`cat a.jsonl b.jsonl`, each saved by an editor that writes a BOM: the marks start lines 1 and 2."""
    first, second = (json.dumps(item) for item in _items("joined", 2))
    body = ("\ufeff" + first + "\r\n\ufeff\n\ufeff \t\r\n\ufeff\ufeff" + second + "\r\n").encode()  # and empty files
    response = _submit(api, api.factory_a, body, "application/jsonl")
    assert response.status_code == 202 and response.json()["counts"]["pending"] == 2, response.text


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-le", "utf-16-be", "utf-32", "utf-32-le"])
@pytest.mark.parametrize("media", ["application/json", "application/jsonl"])
def test_a_body_in_utf16_or_utf32_is_refused_whole_saying_so(api, encoding, media):
    """Windows PowerShell 5 writes UTF-16: read as UTF-8, each line would fail alone (and the NUL bytes
    make a phantom item of the last line end), so the body is refused, naming its encoding."""
    items = _items("wide", 2)
    text = json.dumps({"items": items}) if media == "application/json" else "\r\n".join(map(json.dumps, items))
    response = _submit(api, api.factory_a, text.encode(encoding), media)
    wide = "UTF-16" if "16" in encoding else "UTF-32"
    assert _error(response, 400, "invalid-request") == f"the body is {wide} text: send it as UTF-8 (RFC 8259 §8.1)"
    assert api.service.batches().items == []


@pytest.mark.parametrize("intermediate", ["\udc00", "", "Factory A"])
def test_an_intermediate_id_that_is_no_ca_id_is_refused(api, intermediate):
    body = {"items": _items("no-such-ca", 1), "intermediateId": intermediate}
    response = _submit(api, api.factory_a, body)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid-ca-id", response.text
    assert api.service.batches().items == []  # nothing stored


@pytest.mark.parametrize(
    ("body", "media", "status", "code"),
    [
        (b'{"items": [', "application/json", 400, "invalid-request"),
        (b'{"items": {}}', "application/json", 400, "invalid-request"),
        (b"[]", "application/json", 400, "invalid-request"),
        (b'{"items": [], "extra": 1}', "application/json", 400, "invalid-request"),
        (
            b'{"items": [{"deviceId": "a", "csr": "b"}], "intermediateId": 5}',
            "application/json",
            400,
            "invalid-request",
        ),
        (b'{"items": []}', "application/json", 400, "empty-batch"),
        (b"", "application/jsonl", 400, "empty-batch"),
        (b"\xff\xfe{}", "application/json", 400, "invalid-request"),
        (b'{"items": []}', "text/csv", 415, "unsupported-media-type"),
        (b'{"items": [{"deviceId": "a", "csr": "b"}]}', "", 415, "unsupported-media-type"),
    ],
)
def test_a_malformed_request_is_a_400_and_stores_nothing(api, body, media, status, code):
    before = api.state()
    _error(_submit(api, api.factory_a, body, media), status, code)
    assert api.state() == before


def test_too_many_items_and_conflicting_intermediates_are_refused(api):
    item = {"deviceId": "x", "csr": "y"}
    message = _error(_submit(api, api.admin, {"items": [item] * (MAX_BATCH_ITEMS + 1)}), 400, "too-many-items")
    assert "10000" in message
    lines = "\n".join([json.dumps(item)] * (MAX_BATCH_ITEMS + 1)).encode()
    _error(_submit(api, api.admin, lines, "application/x-ndjson"), 400, "too-many-items")
    both = {"items": [item], "intermediateId": "factory-a"}
    _error(_submit(api, api.admin, both, intermediateId="factory-b"), 400, "conflicting-parameters")
    _error(
        _submit(api, api.factory_a, {"items": [item], "intermediateId": "factory-b"}), 403, "intermediate-not-allowed"
    )
    assert api.service.batches().items == []


def test_the_batch_route_takes_a_body_of_10_000_p384_csrs_and_no_more(api):
    assert BATCH_BODY_LIMIT == 10 * 1024 * 1024
    headers = {"Content-Type": "application/json", "Content-Length": str(BATCH_BODY_LIMIT + 1), **bearer(api.admin)}
    response = api.client.post("/api/batches", content=b"x" * (BATCH_BODY_LIMIT + 1), headers=headers)
    assert str(BATCH_BODY_LIMIT) in _error(response, 413, "body-too-large")
    over_csr_cap = {"items": [{"deviceId": "big", "csr": make_csr("big").decode() + " " * 9000}]}
    assert _submit(api, api.admin, over_csr_cap).status_code == 202  # over the one-CSR route's cap: fine here


def test_only_the_submitter_or_an_admin_reads_a_batch(api):
    mine = _submit(api, api.factory_a, {"items": _items("mine", 1)}).json()["id"]
    theirs = _submit(api, api.factory_b, {"items": _items("theirs", 1)}).json()["id"]
    hidden = api.client.get(f"/api/batches/{theirs}", headers=bearer(api.factory_a))
    unknown = api.client.get("/api/batches/0123456789abcdef", headers=bearer(api.factory_a))
    assert _error(hidden, 404, "batch-not-found") == f"no batch with ID {theirs!r}"
    _error(unknown, 404, "batch-not-found")
    assert api.client.get(f"/api/batches/{theirs}", headers=bearer(api.admin)).status_code == 200
    listed = api.client.get("/api/batches", headers=bearer(api.factory_a)).json()
    assert [b["id"] for b in listed["items"]] == [mine] and listed["nextCursor"] is None
    everyone = api.client.get("/api/batches", params={"limit": 1}, headers=bearer(api.admin)).json()
    assert [b["id"] for b in everyone["items"]] == [mine] and everyone["nextCursor"]
    following = api.client.get(
        "/api/batches", params={"limit": 1, "cursor": everyone["nextCursor"]}, headers=bearer(api.admin)
    ).json()
    assert [b["id"] for b in following["items"]] == [theirs]
    bad = api.client.get("/api/batches", params={"cursor": "!"}, headers=bearer(api.admin))
    _error(bad, 400, "invalid-request")


@pytest.mark.parametrize(
    "body",
    [
        b'{"items": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
        b'{"items": [{"deviceId": "a", "csr": "b", "n": ' + b"1" * 5000 + b"}]}",
    ],
    ids=["nested-too-deeply", "number-too-long"],
)
def test_json_nested_too_deeply_or_with_a_huge_number_is_a_400_that_names_no_internals(api, body):
    before = api.state()
    message = _error(_submit(api, api.factory_a, body), 400, "invalid-request")
    assert "nested too deeply" in message and "sys." not in message and "recursion" not in message.lower()
    assert api.state() == before


def test_json_lines_nested_too_deeply_fail_that_item_alone(api):
    good = json.dumps(_items("deep", 1)[0]).encode()
    body = b"\n".join([good, b"[" * 100_000 + b"]" * 100_000, b'{"n": ' + b"1" * 5000 + b"}"])
    response = _submit(api, api.factory_a, body, "application/jsonl")
    assert response.status_code == 202, response.text
    assert response.json()["counts"] == {"total": 3, "pending": 1, "issued": 0, "failed": 2}


def test_json_lines_break_at_line_feeds_only(api):
    """A BOM, CRLF and blank lines are read as they come; U+2028, U+0085 or a form feed inside a line (JSON
    allows them unescaped in a string) do not cut it in two."""
    item = _items("lines-only", 1)[0]
    odd = json.dumps({"deviceId": "odd\u2028\x85\x0cid", "csr": item["csr"]}, ensure_ascii=False)
    body = ("\ufeff" + json.dumps(item) + "\r\n\r\n" + odd + "\r\n").encode()
    response = _submit(api, api.factory_a, body, "application/jsonl")
    assert response.status_code == 202, response.text
    assert response.json()["counts"]["total"] == 2
    deliver_chunks(api.service)
    done = api.client.get(f"/api/batches/{response.json()['id']}", headers=bearer(api.factory_a)).json()
    assert [r["deviceId"] for r in done["results"]] == ["lines-only-0", "odd\u2028\x85\x0cid"]
    assert done["results"][0]["status"] == "issued" and done["results"][1]["status"] == "failed"


def test_a_csr_that_is_not_printable_ascii_fails_alone_and_the_largest_chunk_is_stored(api):
    """A CSR is PEM: other characters fail the item at once. As JSON, U+20AC or U+0000 takes 6 bytes, so a chunk
    of 8,000 of them an item was over Table Storage's 4 MiB transaction and the whole request a 500; a chunk of
    the longest ASCII CSRs that JSON doubles (quotes, backslashes) is stored."""
    head = "-----BEGIN CERTIFICATE REQUEST-----\n"
    odd = [{"deviceId": f"odd-{n}", "csr": head + ("\u20ac", "\x00")[n % 2] * 8000} for n in range(100)]
    worst = [{"deviceId": f"quoted-{n}", "csr": head + '"\\' * 4000} for n in range(100)]
    for items, failed in ((odd, 100), (worst, 0)):
        response = _submit(api, api.factory_a, {"items": [*items, *_items(f"fine-{failed}", 1)]})
        assert response.status_code == 202, response.text
        assert response.json()["counts"]["failed"] == failed
    deliver_chunks(api.service)
    results = api.client.get(f"/api/batches/{response.json()['id']}?limit=1000", headers=bearer(api.factory_a)).json()
    assert results["status"] == "done-with-failures" and results["counts"]["issued"] == 1
    first = api.service.batch_results(api.service.batches().items[0].record.id).results[0]
    assert first.error == (
        "invalid-item",
        "item 0: " + "csr is not PEM text: it holds characters other than printable ASCII and line breaks",
    )


def test_a_batch_items_failures_speak_of_the_item_and_say_how_to_renew_its_device(api):
    first = api.client.post(
        "/api/devices/renewed-1/certificate",
        content=make_csr("renewed-1"),
        headers={"Content-Type": "application/pkcs10", **bearer(api.factory_a)},
    )
    assert first.status_code == 201, first.text
    serial = first.json()["serialNumber"]
    key = "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"
    items = [
        {"deviceId": "renewed-1", "csr": make_csr("renewed-1").decode()},  # another key for a certified device
        {"deviceId": "plain-1", "csr": make_csr("plain-1").decode() + key},
        {"deviceId": "plain-2", "csr": "hello"},
    ]
    batch = _submit(api, api.factory_a, {"items": items}).json()
    deliver_chunks(api.service)
    results = api.client.get(f"/api/batches/{batch['id']}", headers=bearer(api.factory_a)).json()["results"]
    assert [(r["error"]["code"], r["error"]["message"]) for r in results] == [
        (
            "device-has-certificate",
            f"device 'renewed-1' already has an active certificate (serial {serial}) for another key; a batch does "
            "not renew: renew this device alone with POST /api/devices/renewed-1/certificate?renew=true, or python "
            "cli.py sign-csr CSR_FILE --device-id renewed-1 --renew",
        ),
        (
            "private-key-in-body",
            "the item's csr holds a PEM PRIVATE KEY: send only the CSR (a device's key never leaves it)",
        ),
        ("not-a-csr", "the item's csr is not a PKCS#10 certificate signing request (PEM, DER or base64)"),
    ]
