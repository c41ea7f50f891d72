"""`python cli.py sign-batch`: a JSON Lines file or a folder of CSRs, a results file and PEM chains, and a
run after an interruption that signs only what is left, never twice."""

import json
import os

import pytest
from cryptography.hazmat.primitives import serialization

import cli
from shared.ledger.models import CertificateQuery

from .certrules import check_device, load, load_chain
from .csrs import make_csr

pytestmark = pytest.mark.usefixtures("cli_logging_restored")


@pytest.fixture
def scene(embedded_service, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PKI_HOME", str(embedded_service.settings.pki_home))
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    return embedded_service, tmp_path


def _lines(items: list) -> str:
    return "".join((item if isinstance(item, str) else json.dumps(item)) + "\n" for item in items)


def _item(device_id: str) -> dict:
    return {"deviceId": device_id, "csr": make_csr(device_id).decode()}


def _results(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _json_listing(capsys) -> str:
    """Every certificate, as `list-certificates --json` gives them (its items, as JSON text)."""
    capsys.readouterr()
    assert cli.main(["list-certificates", "--limit", "1000", "--json"]) == 0
    return json.dumps(json.loads(capsys.readouterr().out)["items"])


def _certificates(service) -> list:
    return service.ledger.list_certificates(CertificateQuery(limit=1000)).items


def test_a_json_lines_file_is_signed_with_results_and_chains(scene, capsys, monkeypatch):
    service, folder = scene
    source = folder / "line-7.jsonl"
    source.write_text(_lines([_item("cli-0"), "{broken", _item("cli-1"), {"deviceId": "cli-2"}, _item("cli-3")]))
    monkeypatch.setenv("FORCE_COLOR", "1")  # as on a terminal: the progress bar is drawn on stderr
    assert cli.main(["sign-batch", str(source), "--pem-dir", "chains"]) == cli.EXIT_ITEMS_FAILED
    out, err = capsys.readouterr()
    assert "signing" in err and "5/5" in err
    assert "Signed 3 of 5 item(s): 3 new, 0 given back from the ledger (the same CSR); 2 failed." in out
    (batch_id,) = [b.record.id for b in service.batches().items]
    assert f"Batch(es) in the ledger (GET /api/batches/ID): {batch_id}" in out
    results = _results(folder / "line-7.results.jsonl")
    assert [(r["item"], r["line"], r["status"]) for r in results] == [
        (0, 1, "issued"),
        (1, 2, "failed"),  # not JSON: failed in the batch, which names its line as POST /api/batches does
        (2, 3, "issued"),
        (3, 4, "failed"),
        (4, 5, "issued"),
    ]
    assert results[1]["error"] == {
        "code": "invalid-item",
        "message": "line 2 is not JSON: Expecting property name enclosed in double quotes (column 2)",
    }
    assert results[3]["error"] == {"code": "invalid-item", "message": "line 4: csr is missing or not a string (PEM)"}
    assert results[3]["deviceId"] == "cli-2"
    intermediate = load(service.intermediate("factory-a").certificate_pem)
    for result in results:
        if result["status"] == "issued":
            device, _ = load_chain((folder / "chains" / f"{result['deviceId']}.pem").read_text())
            check_device(device, intermediate, result["deviceId"])
            assert result["bundle"]["certificateChain"] == (folder / "chains" / f"{result['deviceId']}.pem").read_text()
    assert len(_certificates(service)) == 3
    (batch,) = service.batches().items
    assert batch.record.requested_by.startswith("cli:") and batch.status == "done-with-failures"


def test_a_run_after_an_interruption_signs_only_what_is_left_and_never_twice(scene, capsys):
    service, folder = scene
    items = [_item(f"resume-{n}") for n in range(6)]
    source = folder / "devices.jsonl"
    source.write_text(_lines(items[:2]))
    assert cli.main(["sign-batch", str(source), "--json"]) == 0  # the first run got as far as two items
    first = json.loads(capsys.readouterr().out)
    assert (first["issued"], first["created"], first["skipped"]) == (2, 2, 0)
    # ... and committed a third, stopping before its result was written
    committed = service.sign_csr(items[2]["csr"], "resume-2", requested_by="cli:test")
    source.write_text(_lines(items))
    assert cli.main(["sign-batch", str(source), "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert (second["issued"], second["created"], second["skipped"], second["failed"]) == (4, 3, 2, 0)
    results = _results(folder / "devices.results.jsonl")
    assert sorted(r["deviceId"] for r in results) == [f"resume-{n}" for n in range(6)]  # each once
    again = next(r for r in results if r["deviceId"] == "resume-2")
    assert again["created"] is False and again["bundle"]["serialNumber"] == committed.record.serial
    assert len(_certificates(service)) == 6

    assert cli.main(["sign-batch", str(source)]) == 0  # nothing left
    assert "Skipped 6 item(s) already issued" in capsys.readouterr().out
    assert len(_certificates(service)) == 6


def test_a_folder_of_csr_files_named_by_device_id(scene, capsys):
    _, folder = scene
    csrs = folder / "csrs"
    csrs.mkdir()
    (csrs / "dir-pem.csr").write_bytes(make_csr("dir-pem"))
    (csrs / "dir-der.pem").write_bytes(make_csr("dir-der", encoding=serialization.Encoding.DER))
    (csrs / "notes.txt").write_text("not a CSR file")
    results_file = folder / "out.jsonl"
    assert cli.main(["sign-batch", str(csrs), "--results", str(results_file)]) == 0
    assert "Signed 2 of 2 item(s)" in capsys.readouterr().out
    assert sorted(r["deviceId"] for r in _results(results_file) if r["status"] == "issued") == ["dir-der", "dir-pem"]
    # a file name that is not UTF-8: that item fails alone, named as well as it can be (U+FFFD)
    (csrs / os.fsdecode(b"dir-\xff.csr")).write_bytes(make_csr("dir-odd"))
    (csrs / "dir-new.csr").write_bytes(make_csr("dir-new"))
    results_file.unlink()
    assert cli.main(["sign-batch", str(csrs), "--results", str(results_file)]) == cli.EXIT_ITEMS_FAILED
    assert (
        "Signed 3 of 4 item(s): 1 new, 2 given back from the ledger (the same CSR); 1 failed."
        in capsys.readouterr().out
    )
    by_status = {(r["deviceId"], r["status"]) for r in _results(results_file)}
    assert {("dir-\ufffd", "failed"), ("dir-new", "issued")} <= by_status


def test_a_folder_takes_every_form_of_csr_file_the_api_takes_and_keeps_chains_apart(scene, capsys):
    """CSR files as editors and tools save them (a UTF-8 or UTF-16 byte-order mark, `openssl req -text`'s
    text around the PEM block) are read as POST /api/devices/{id}/certificate reads a body; chains written
    into the folder itself would be read as CSRs by the next run, so --pem-dir must name another."""
    _, folder = scene
    csrs = folder / "forms"
    csrs.mkdir()
    (csrs / "win-bom8.csr").write_bytes(b"\xef\xbb\xbf" + make_csr("win-bom8"))
    (csrs / "win-utf16.csr").write_bytes(make_csr("win-utf16").decode().encode("utf-16"))
    (csrs / "win-text.csr").write_bytes(b"Certificate Request:\n    Data: ...\n" + make_csr("win-text"))
    assert cli.main(["sign-batch", str(csrs), "--json"]) == 0, capsys.readouterr()
    assert json.loads(capsys.readouterr().out)["issued"] == 3
    assert cli.main(["sign-batch", str(csrs), "--pem-dir", str(csrs)]) == 1
    assert "is the folder of CSR files" in capsys.readouterr().err


def test_a_file_with_no_items_is_refused_as_the_api_refuses_an_empty_body(scene, capsys):
    _, folder = scene
    for name, content in (("blank.jsonl", b"\xef\xbb\xbf\n \t\r\n"), ("empty.json", b'{"items": []}')):
        source = folder / name
        source.write_bytes(content)
        assert cli.main(["sign-batch", str(source), "--json"]) == 1
        assert json.loads(capsys.readouterr().out)["error"]["code"] == "empty-batch", name
        assert not source.with_name(name.split(".")[0] + ".results.jsonl").exists()


def test_a_refused_batch_is_one_line_and_signs_nothing(scene, capsys):
    service, folder = scene
    source = folder / "stop.jsonl"
    source.write_text(_lines([_item("stop-0")]))
    service.set_intermediate_enabled("factory-a", False)
    assert cli.main(["sign-batch", str(source), "--intermediate", "factory-a"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: intermediate 'factory-a' is disabled; enable it or use another"
    ]
    assert not (folder / "stop.results.jsonl").exists() and service.batches().items == []


def test_the_cli_signs_on_a_factorys_behalf_by_its_rules(scene, capsys):
    """--factory: the factory's intermediates and ownership, so the factory can renew its devices itself;
    without it the device is the admins' and a factory hears that it was certified by someone else."""
    service, folder = scene
    service.create_intermediate("factory-b")
    service.principals.create_factory("line-1", ["factory-a"])
    csr = folder / "f-1.csr"
    csr.write_bytes(make_csr("f-1"))
    assert cli.main(["sign-csr", str(csr), "--device-id", "f-1", "--factory", "line-1", "--json"]) == 0
    issued = json.loads(capsys.readouterr().out)
    assert issued["intermediateId"] == "factory-a"  # not the newest (factory-b): the factory's own
    record = service.certificate(issued["serialNumber"])
    assert record.requested_by == "line-1"
    assert service.ledger.device_owners(["f-1"]) == {"f-1": "line-1"}
    renewed = service.sign_csr(
        make_csr("f-1"), "f-1", requested_by="line-1", renew=True, allowed_intermediates=["factory-a"]
    )
    assert renewed.created

    source = folder / "batch.jsonl"
    source.write_text(_lines([_item("f-2")]))
    assert cli.main(["sign-batch", str(source), "--factory", "line-1", "--intermediate", "factory-b"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        "error: factory 'line-1' may not sign with intermediate 'factory-b' (list-factories shows the "
        "intermediates each factory may sign with)"
    ]
    assert cli.main(["sign-batch", str(source), "--factory", "line-1", "--json"]) == 0
    assert service.ledger.device_owners(["f-2"]) == {"f-2": "line-1"}
    capsys.readouterr()
    assert cli.main(["list-certificates", "--requested-by", "line-1", "--status", "active", "--json"]) == 0
    assert sorted(c["deviceId"] for c in json.loads(capsys.readouterr().out)["items"]) == ["f-1", "f-2"]
    assert cli.main(["list-certificates", "--requested-by", "Line 1"]) == 2
    assert capsys.readouterr().err.startswith("error: argument --requested-by: principal name 'Line 1' is not")
    assert cli.main(["list-certificates", "--requested-by", "Line 1", "--json"]) == 2  # the rule's code, as the API's
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "invalid-principal-name"
    own = folder / "cli-own.csr"
    own.write_bytes(make_csr("cli-own"))
    assert cli.main(["sign-csr", str(own), "--device-id", "cli-own"]) == 0  # for no factory: cli:<user>
    admins_own = [c["requestedBy"] for c in json.loads(_json_listing(capsys)) if c["requestedBy"].startswith("cli:")]
    assert admins_own
    assert cli.main(["list-certificates", "--requested-by", admins_own[0], "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)["items"]
    assert listed and {c["requestedBy"] for c in listed} == {admins_own[0]}

    admins = folder / "a-1.csr"
    admins.write_bytes(make_csr("a-1"))
    assert cli.main(["sign-csr", str(admins), "--device-id", "a-1"]) == 0
    capsys.readouterr()
    assert cli.main(["sign-csr", str(admins), "--device-id", "a-1", "--factory", "line-1", "--renew"]) == 1
    assert "first certified by another factory or by a CA admin" in capsys.readouterr().err
    assert cli.main(["sign-csr", str(admins), "--device-id", "a-1", "--factory", "nobody"]) == 1
    assert "no factory called 'nobody'" in capsys.readouterr().err
    service.principals.create_admin_key("ops")
    assert cli.main(["sign-csr", str(admins), "--device-id", "a-1", "--factory", "ops"]) == 1
    assert "'ops' is an admin, not a factory" in capsys.readouterr().err


def test_a_line_that_is_not_utf8_fails_alone_as_the_api_fails_it(scene, capsys):
    """Each line is decoded on its own (shared.jsonlines, as POST /api/batches reads a body): a Latin-1
    device ID fails its item, named by its line, and the lines around it are signed; a BOM is dropped."""
    service, folder = scene
    source = folder / "mixed.jsonl"
    good = [json.dumps(_item(f"mixed-{n}")).encode() for n in range(2)]
    source.write_bytes(b"\xef\xbb\xbf" + good[0] + b'\n{"deviceId": "caf\xe9", "csr": "x"}\r\n' + good[1] + b"\n")
    assert cli.main(["sign-batch", str(source), "--json"]) == cli.EXIT_ITEMS_FAILED
    summary = json.loads(capsys.readouterr().out)
    assert (summary["issued"], summary["failed"]) == (2, 1)
    results = _results(folder / "mixed.results.jsonl")
    assert [(r["line"], r["status"]) for r in results] == [(1, "issued"), (2, "failed"), (3, "issued")]
    assert results[1]["error"] == {"code": "invalid-item", "message": "line 2 is not UTF-8 text"}
    assert sorted(c.device_id for c in _certificates(service)) == ["mixed-0", "mixed-1"]


def test_a_file_in_utf16_is_refused_saying_how_to_save_it(scene, capsys):
    service, folder = scene
    source = folder / "powershell.jsonl"
    source.write_text(_lines([_item("ps-0"), _item("ps-1")]), encoding="utf-16")
    assert cli.main(["sign-batch", str(source)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {source} is UTF-16 text: save it as UTF-8 (PowerShell: Out-File -Encoding utf8, or Set-Content "
        "-Encoding utf8)"
    ]
    assert service.batches().items == [] and not (folder / "powershell.results.jsonl").exists()


def test_a_results_file_torn_or_damaged_by_a_killed_run_is_resumed_from(scene, capsys):
    """A run killed mid-line leaves a line without its end, or a disk leaves bytes that are not UTF-8: the
    next run starts its lines on a line of their own and still skips what was issued."""
    service, folder = scene
    items = [_item(f"torn-{n}") for n in range(3)]
    source = folder / "devices.jsonl"
    source.write_text(_lines(items[:1]))
    assert cli.main(["sign-batch", str(source), "--json"]) == 0
    capsys.readouterr()
    results = folder / "devices.results.jsonl"
    with results.open("ab") as file:
        file.write(b"\xff\xfe not utf-8\n")
        file.write(b'{"item": 1, "deviceId": "torn-1", "status": "iss')  # killed here
    source.write_text(_lines([*items, " " + "[" * 100_000 + "]" * 100_000]))
    assert cli.main(["sign-batch", str(source), "--json"]) == 4  # an item failed: the line nested too deeply
    second = json.loads(capsys.readouterr().out)
    assert (second["issued"], second["skipped"], second["failed"]) == (2, 1, 1)
    lines = results.read_bytes().split(b"\n")
    tail = [json.loads(line) for line in lines[-4:-1]]
    assert lines[-1] == b"" and [(r["deviceId"], r["status"]) for r in tail] == [
        ("torn-1", "issued"),
        ("torn-2", "issued"),
        ("", "failed"),
    ]
    assert tail[2]["error"] == {
        "code": "invalid-item",
        "message": "line 4 is not JSON: nested too deeply, or a number too long",
    }
    assert cli.main(["sign-batch", str(source), "--json"]) == 4  # the torn line spoils only itself
    third = json.loads(capsys.readouterr().out)
    assert (third["issued"], third["skipped"], third["failed"]) == (0, 3, 1)
    assert len(_certificates(service)) == 3


def test_the_results_file_cannot_be_the_input_or_a_csr_file_beside_the_inputs(scene, capsys, monkeypatch):
    service, folder = scene
    monkeypatch.chdir(folder)
    source = folder / "same.jsonl"
    original = _lines([_item("same-0")])
    source.write_text(original)
    csrs = folder / "csrs"
    csrs.mkdir()
    (csrs / "csr-0.csr").write_bytes(make_csr("csr-0"))
    for args, where in (
        (["same.jsonl", "--results", "./same.jsonl"], "the input"),
        ([str(csrs), "--results", str(csrs / "out.pem")], "in the input folder"),
    ):
        assert cli.main(["sign-batch", *args]) == 1
        (line,) = capsys.readouterr().err.splitlines()
        assert line.startswith("error: cannot write the results to ") and f"it is {where}; name another" in line
    assert source.read_text() == original
    assert sorted(p.name for p in csrs.iterdir()) == ["csr-0.csr"]
    assert service.batches().items == [] and _certificates(service) == []


def test_a_json_file_in_the_apis_json_form_is_signed_with_items_named_by_index(scene, capsys):
    service, folder = scene
    service.create_intermediate("factory-b")  # the newest: the default, which the file's intermediateId overrides
    source = folder / "batch.json"
    document = {"items": [_item("form-0"), {"deviceId": "form-1"}, _item("form-2")], "intermediateId": "factory-a"}
    source.write_text(json.dumps(document, indent=2))
    assert cli.main(["sign-batch", str(source)]) == cli.EXIT_ITEMS_FAILED
    assert "Signed 2 of 3 item(s): 2 new" in capsys.readouterr().out
    results = _results(folder / "batch.results.jsonl")
    assert [(r["item"], r["status"], "line" in r) for r in results] == [
        (0, "issued", False),
        (1, "failed", False),
        (2, "issued", False),
    ]
    assert results[1]["error"] == {"code": "invalid-item", "message": "csr is missing or not a string (PEM)"}
    assert {r["bundle"]["intermediateId"] for r in results if r["status"] == "issued"} == {"factory-a"}

    assert cli.main(["sign-batch", str(source), "--intermediate", "factory-b"]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"error: {source} names intermediate 'factory-a' (intermediateId) and --intermediate names 'factory-b'; "
        "leave out one of them"
    ]
    for broken, words in (
        ({"items": {"deviceId": "x"}}, f'{source} must be a JSON object {{"items": [{{"deviceId", "csr"}}, ...]}}'),
        ({"items": [], "extra": 1}, f"unknown field(s) in {source}: 'extra'"),
        ({"items": [], "intermediateId": 7}, f"{source}: intermediateId must be a string"),
    ):
        source.write_text(json.dumps(broken))
        assert cli.main(["sign-batch", str(source)]) == 1
        assert capsys.readouterr().err.splitlines() == [f"error: {words}"]
    assert len(_certificates(service)) == 2


def test_an_item_for_a_device_with_a_certificate_says_to_renew_it_alone(scene, capsys):
    service, folder = scene
    first = service.sign_csr(make_csr("held-1"), "held-1", requested_by="cli:test")
    source = folder / "renew.jsonl"
    source.write_text(_lines([_item("held-1"), {"deviceId": "held-2", "csr": "hello"}]))
    assert cli.main(["sign-batch", str(source)]) == cli.EXIT_ITEMS_FAILED
    capsys.readouterr()
    held, other = _results(folder / "renew.results.jsonl")
    assert held["error"] == {
        "code": "device-has-certificate",
        "message": f"device 'held-1' already has an active certificate (serial {first.record.serial}) for another "
        "key; a batch does not renew: renew this device alone with POST /api/devices/held-1/certificate?renew=true, "
        "or python cli.py sign-csr CSR_FILE --device-id held-1 --renew",
    }
    assert other["error"] == {
        "code": "not-a-csr",
        "message": "the item's csr is not a PKCS#10 certificate signing request (PEM, DER or base64)",
    }
