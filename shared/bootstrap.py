"""First start of a local CA: a root, an intermediate, an admin key and a factory key, made once."""

from dataclasses import dataclass

from .service import DeviceCA
from .service.access import NewApiKey

LOCAL_INTERMEDIATE = "local-factory-ca"
LOCAL_FACTORY = "local-factory"


@dataclass(frozen=True)
class LocalSetup:
    intermediate_id: str
    admin: NewApiKey
    factory: NewApiKey


def bootstrap_local(service: DeviceCA) -> LocalSetup | None:
    """Set up an empty PKI home for local use; None when it already holds a root."""
    if service.ledger.get_root() is not None:
        return None
    service.create_root()
    intermediate = service.create_intermediate(LOCAL_INTERMEDIATE).record
    admin = service.principals.create_admin_key("admin")
    factory = service.principals.create_factory(LOCAL_FACTORY, [intermediate.id])
    return LocalSetup(intermediate.id, admin, factory)
