"""Batch signing end to end against signing the same CSRs in process, measured in the same run.

The batch path is the whole of it: POST /api/batches (JSON, through the HTTP API in process), the chunk
messages on a real Storage queue (Azurite, base64 as host.json says), each message received, decoded and
handed to the registered queue function as the Functions host does (on HOST_THREADS threads, as the
Python worker runs up to host.json's batchSize at once), then every result read back through
GET /api/batches/{id}, page by page.
The reference signs the same CSRs with `sign_csrs` in chunks of the same size (one ledger commit each), on
a CA of its own. Both use local key files and SQLite. Certificates a second for both, and the ratio.

    python bench/batch_sign.py [--count 10000]
"""

import argparse
import base64
import json
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import azure.functions as func
from azure.functions.queue import QueueMessage
from azure.storage.queue import QueueClient
from common import device_csrs
from fastapi.testclient import TestClient

from shared.api import create_app
from shared.batch_functions import batch_functions
from shared.composition import build_service
from shared.config import Settings
from shared.queues import BATCH_CHUNKS, host_message_encoding
from shared.service import DeviceCA, IssuedCertificate, SignRequest
from shared.service.batches import CHUNK_SIZE
from tests.azurite import Azurite

TARGET = 0.5
# The Python worker runs a sync function's invocations on a thread pool (up to host.json's batchSize at once);
# a few threads here, on a machine of two cores.
HOST_THREADS = 4


def fresh_ca(home: Path, **settings: str) -> DeviceCA:
    service = build_service(replace(Settings(pki_home=home, ca_curve="P-256"), **settings))
    service.create_root()
    service.create_intermediate("bench")
    return service


def in_process(service: DeviceCA, csrs: list[tuple[str, bytes]]) -> float:
    """Certificates a second: sign_csrs over the CSRs, CHUNK_SIZE at a time."""
    requests = [SignRequest(csr, device) for device, csr in csrs]
    started = time.perf_counter()
    for start in range(0, len(requests), CHUNK_SIZE):
        for result in service.sign_csrs(requests[start : start + CHUNK_SIZE], requested_by="bench"):
            if not isinstance(result, IssuedCertificate):
                raise SystemExit(f"refused: {result}")
    return len(requests) / (time.perf_counter() - started)


def through_the_queue(service: DeviceCA, csrs: list[tuple[str, bytes]], connection: str) -> float:
    """Certificates a second: submit, queue, queue function, results read back."""
    admin = service.principals.create_admin_key().secret
    headers = {"Authorization": f"Bearer {admin}"}
    client = TestClient(create_app(service))
    app = func.AsgiFunctionApp(app=create_app(service), http_auth_level=func.AuthLevel.ANONYMOUS)
    app.register_functions(batch_functions(lambda: service))
    (sign_chunk,) = [f.get_user_function() for f in app.get_functions() if f.get_function_name() == "sign_batch_chunk"]
    queue = QueueClient.from_connection_string(connection, BATCH_CHUNKS)
    base64_encoded = host_message_encoding() == "base64"
    body = json.dumps({"items": [{"deviceId": device, "csr": csr.decode()} for device, csr in csrs]})

    started = time.perf_counter()
    response = client.post("/api/batches", content=body, headers={**headers, "Content-Type": "application/json"})
    if response.status_code != 202:
        raise SystemExit(f"submit refused: {response.status_code} {response.text[:200]}")
    batch_id = response.json()["id"]

    def deliver(message: Any) -> None:
        text = base64.b64decode(message.content) if base64_encoded else message.content
        sign_chunk(QueueMessage(id=message.id, body=text, dequeue_count=message.dequeue_count))
        queue.delete_message(message)

    with ThreadPoolExecutor(max_workers=HOST_THREADS) as pool:
        while messages := list(queue.receive_messages(max_messages=32, visibility_timeout=300)):
            list(pool.map(deliver, messages))
    issued, cursor = 0, None
    while True:
        params = {"limit": 1000, **({"cursor": cursor} if cursor else {})}
        page = client.get(f"/api/batches/{batch_id}", params=params, headers=headers).json()
        issued += sum(result["status"] == "issued" for result in page["results"])
        cursor = page["nextCursor"]
        if cursor is None:
            break
    elapsed = time.perf_counter() - started
    if issued != len(csrs) or page["status"] != "done":
        raise SystemExit(f"the batch ended {page['status']} with {issued} of {len(csrs)} issued")
    return len(csrs) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=10_000, help="CSRs in the batch (default 10000, the most)")
    args = parser.parse_args()
    csrs = device_csrs(args.count, "batch")
    azurite = Azurite("queue")
    try:
        with tempfile.TemporaryDirectory() as work:
            reference = fresh_ca(Path(work) / "in-process")
            try:
                direct = in_process(reference, csrs)
            finally:
                reference.close()
            batched = fresh_ca(Path(work) / "batch", queue_storage=azurite.connection_string)
            try:
                queued = through_the_queue(batched, csrs, azurite.connection_string)
            finally:
                batched.close()
    finally:
        azurite.stop()
    ratio = queued / direct
    print(f"{args.count} P-256 CSRs, local keys, SQLite ledger, chunks of {CHUNK_SIZE}")
    print(f"  in process (sign_csrs):                         {direct:8.0f} certificates/s")
    print(f"  batch (API, Azurite queue, function, results):  {queued:8.0f} certificates/s")
    print(f"  ratio: {ratio:.2f} (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'})")


if __name__ == "__main__":
    main()
