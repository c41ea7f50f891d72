"""`make run` takes batches: `serve` on the embedded default signs them in its own process (the in-process
queue's worker runs the same chunk handler as the queue-triggered function)."""

import json
import re
import time
import urllib.request

import pytest

from .csrs import make_csr
from .test_serve import _banner, _free_port, _serving, _wait_until_serving


def _request(port: int, method: str, path: str, key: str, body: dict | None = None) -> tuple[int, dict]:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {key}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request) as response:  # noqa: S310 - loopback
        return response.status, json.loads(response.read())


def test_serve_signs_a_batch_in_its_own_process(tmp_path):
    port = _free_port()
    with _serving(tmp_path / "pki", tmp_path, port) as server:
        key = re.search(r"factory key:\s+(dca_[0-9a-f]{16}_\S{43})", _banner(server)).group(1)
        _wait_until_serving(port, server)
        items = [{"deviceId": f"served-{n}", "csr": make_csr(f"served-{n}").decode()} for n in range(3)]
        status, batch = _request(port, "POST", "/api/batches", key, {"items": items})
        assert status == 202
        for _ in range(600):  # the worker signs it in the background
            status, progress = _request(port, "GET", f"/api/batches/{batch['id']}", key)
            if progress["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        else:
            pytest.fail(f"the batch is still {progress['status']}")
    assert progress["status"] == "done" and progress["counts"]["issued"] == 3
    assert [r["bundle"]["deviceId"] for r in progress["results"]] == ["served-0", "served-1", "served-2"]
