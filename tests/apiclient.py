"""An API under test: a CA with principals of every kind, and a TestClient that never raises."""

from dataclasses import dataclass

from fastapi.testclient import TestClient

from shared.api import create_app
from shared.ledger.models import CertificateQuery
from shared.queues import BATCH_CHUNKS, InProcessQueue
from shared.service import DeviceCA


@dataclass
class Api:
    client: TestClient
    service: DeviceCA
    admin: str
    factory_a: str  # bound to factory-a
    factory_b: str  # bound to factory-b
    revoked: str  # factory-a's key, revoked

    def post_csr(self, device_id: str, csr: bytes, key: str | None, media: str = "application/pkcs10", **params):
        headers = {"Content-Type": media}
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return self.client.post(f"/api/devices/{device_id}/certificate", content=csr, headers=headers, params=params)

    def certificate_count(self) -> int:
        return len(self.service.ledger.list_certificates(CertificateQuery(limit=1000)).items)

    def state(self) -> tuple:
        """Everything a request could write, to show that a refused one wrote nothing."""
        ledger = self.service.ledger
        return (
            [(c.serial, c.status) for c in ledger.list_certificates(CertificateQuery(limit=1000)).items],
            [(ca.id, ca.status) for ca in ledger.list_cas()],
            [(k.id, k.revoked_at) for k in ledger.list_api_keys()],
            ledger.list_principals(),
            [batch.record.id for batch in ledger.list_batches(None, 1000, None).items],
        )


def make_api(service: DeviceCA) -> Api:
    """`service` has a root and intermediate factory-a; this adds factory-b and the principals."""
    service.create_intermediate("factory-b")
    principals = service.principals
    admin = principals.create_admin_key().secret
    factory_a = principals.create_factory("factory-one", ["factory-a"]).secret
    factory_b = principals.create_factory("factory-two", ["factory-b"]).secret
    revoked = principals.create_api_key("factory-one")
    principals.revoke_api_key(revoked.key.id)
    # batch chunks wait on a queue without a worker: a test delivers them (deliver_chunks), so that no
    # signing runs behind its back
    service.batch_queue = InProcessQueue(BATCH_CHUNKS)
    client = TestClient(create_app(service), raise_server_exceptions=False)
    return Api(client, service, admin, factory_a, factory_b, revoked.secret)


def bearer(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def deliver_chunks(service: DeviceCA) -> int:
    """Run the chunk handler on every message waiting on the service's in-process batch queue."""
    delivered = 0
    while (message := service.batch_queue.take()) is not None:
        service.sign_batch_chunk(message)
        delivered += 1
    return delivered
