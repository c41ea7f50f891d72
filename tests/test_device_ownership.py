"""Who may certify a device (DESIGN "Who owns a device"): its owner and admins, on every signing path.

Two factories and an admin go through a device's lifecycle (first certificate, same-CSR retry, a new key,
renewal, after expiry, after revocation, after the owner is re-bound) on every path that signs: the HTTP
route and each of the service's signing entry points. Only the owner and the admin succeed; the other
factory is refused with a message that names nothing of the owner's, and nothing changes.
"""

import asyncio
import dataclasses
import multiprocessing
from collections.abc import Callable
from dataclasses import dataclass

import pytest

from shared.errors import CaError
from shared.ledger.models import CertificateQuery, Issuance
from shared.service import RENEWAL_RETRY_WINDOW, DeviceCA, SignRequest

from .apiclient import Api, deliver_chunks, make_api
from .csrs import device_key, make_csr

OWNER, OTHER, ADMIN = "owner", "other-factory", "admin"
OWNED = "device-owned-by-another-factory"


@dataclass
class Attempt:
    """What one caller sends for the device, after the scenario has set it up."""

    csr: bytes
    renew: bool = False


@dataclass
class Outcome:
    status: int
    code: str | None
    message: str | None
    serial: str | None


def _first(api: Api, device: str, by: str = "factory-one", key=None) -> str:
    """The device's first certificate, asked for by `by` (a factory's principal ID, or an admin)."""
    allowed = None if by == "admin" else api.service.principals.principal(by).intermediates
    csr = make_csr(device, key=key)
    return api.service.sign_csr(csr, device, requested_by=by, allowed_intermediates=allowed).record.serial


def new_device(api, clock, device):
    return Attempt(make_csr(device))


def same_csr_retry(api, clock, device):
    key = device_key()
    _first(api, device, key=key)
    return Attempt(make_csr(device, key=key))


def new_key_without_renew(api, clock, device):
    _first(api, device)
    return Attempt(make_csr(device))


def renewal(api, clock, device):
    _first(api, device)
    return Attempt(make_csr(device), renew=True)


def same_key_renewal(api, clock, device):
    """A renewal that keeps the device's key, once the first certificate is older than a retry's window."""
    key = device_key()
    _first(api, device, key=key)
    clock.advance(seconds=RENEWAL_RETRY_WINDOW.total_seconds() + 1)
    return Attempt(make_csr(device, key=key), renew=True)


def retried_renewal(api, clock, device):
    """The owner renewed with a new key and retries the same renewal (a timeout, say): the renewal's
    certificate again, not another one."""
    _first(api, device)
    key = device_key()
    owner = api.service.principals.principal("factory-one")
    csr = make_csr(device, key=key)
    api.service.sign_csr(csr, device, requested_by=owner.id, allowed_intermediates=owner.intermediates, renew=True)
    clock.advance(seconds=RENEWAL_RETRY_WINDOW.total_seconds() - 1)
    return Attempt(csr, renew=True)


def after_expiry(api, clock, device):
    _first(api, device)
    clock.advance(days=api.service.settings.device_days + 1)
    return Attempt(make_csr(device))


def after_revocation(api, clock, device):
    api.service.revoke(_first(api, device), "keyCompromise")
    return Attempt(make_csr(device))


def revoked_key_again(api, clock, device):
    key = device_key()
    api.service.revoke(_first(api, device, key=key), "keyCompromise")
    return Attempt(make_csr(device, key=key))


def owner_rebound(api, clock, device):
    """The owner is moved to another intermediate: it keeps its devices."""
    key = device_key()
    _first(api, device, key=key)
    api.service.principals.bind_factory("factory-one", ["factory-c"])
    return Attempt(make_csr(device, key=key), renew=False)


def admin_certified_first(api, clock, device):
    """An admin certified the device first: no factory owns it, so only admins may certify it."""
    _first(api, device, by="admin")
    return Attempt(make_csr(device), renew=True)


# scenario -> expected status per caller; for a new device the "owner" is simply the first factory to ask
SCENARIOS: dict[str, tuple[Callable, dict[str, int | str]]] = {
    "first certificate": (new_device, {OWNER: 201, OTHER: 201, ADMIN: 201}),
    "same-CSR retry": (same_csr_retry, {OWNER: 200, OTHER: OWNED, ADMIN: 200}),
    "new key without renew": (
        new_key_without_renew,
        {OWNER: "device-has-certificate", OTHER: OWNED, ADMIN: "device-has-certificate"},
    ),
    "renewal with a new key": (renewal, {OWNER: 201, OTHER: OWNED, ADMIN: 201}),
    "renewal with the same key": (same_key_renewal, {OWNER: 201, OTHER: OWNED, ADMIN: 201}),
    "retried renewal": (retried_renewal, {OWNER: 200, OTHER: OWNED, ADMIN: 200}),
    "new key after expiry": (after_expiry, {OWNER: 201, OTHER: OWNED, ADMIN: 201}),
    "new key after revocation": (after_revocation, {OWNER: 201, OTHER: OWNED, ADMIN: 201}),
    "revoked key again": (revoked_key_again, {OWNER: "key-revoked", OTHER: OWNED, ADMIN: "key-revoked"}),
    "owner re-bound to another intermediate": (owner_rebound, {OWNER: 200, OTHER: OWNED, ADMIN: 200}),
    "an admin certified it first": (admin_certified_first, {OWNER: OWNED, OTHER: OWNED, ADMIN: 201}),
}


def _via_http(api: Api, caller: str, device: str, attempt: Attempt) -> Outcome:
    key = {OWNER: api.factory_a, OTHER: api.factory_b, ADMIN: api.admin}[caller]
    params = {"renew": "true"} if attempt.renew else {}
    response = api.post_csr(device, attempt.csr, key, **params)
    body = response.json()
    if response.status_code >= 400:
        return Outcome(response.status_code, body["error"]["code"], body["error"]["message"], None)
    return Outcome(response.status_code, None, None, body["serialNumber"])


def _options(api: Api, caller: str) -> dict:
    key = {OWNER: api.factory_a, OTHER: api.factory_b, ADMIN: api.admin}[caller]
    who = api.service.principals.authenticate(key)  # the same Caller the HTTP route gets
    return {"requested_by": who.id, "allowed_intermediates": who.intermediates}


def _as_outcome(result) -> Outcome:
    if isinstance(result, CaError):
        return Outcome(result.status, result.code, result.message, None)
    return Outcome(201 if result.created else 200, None, None, result.record.serial)


def _via_sign_csr(api, caller, device, attempt):
    try:
        issued = api.service.sign_csr(attempt.csr, device, renew=attempt.renew, **_options(api, caller))
    except CaError as error:
        return _as_outcome(error)
    return _as_outcome(issued)


def _via_sign_csrs(api, caller, device, attempt):
    (result,) = api.service.sign_csrs([SignRequest(attempt.csr, device)], renew=attempt.renew, **_options(api, caller))
    return _as_outcome(result)


def _via_sign_csr_async(api, caller, device, attempt):
    async def sign():
        return await api.service.sign_csr_async(attempt.csr, device, renew=attempt.renew, **_options(api, caller))

    try:
        return _as_outcome(asyncio.run(sign()))
    except CaError as error:
        return _as_outcome(error)


# Every way into signing. A new signing entry point of the service must be added here (see the last test).
PATHS = {
    "http": _via_http,
    "sign_csr": _via_sign_csr,
    "sign_csrs": _via_sign_csrs,
    "sign_csr_async": _via_sign_csr_async,
}


@pytest.fixture
def api(service):
    api = make_api(service)
    service.create_intermediate("factory-c")
    return api


def _device_state(api: Api, device: str) -> tuple:
    ledger = api.service.ledger
    certificates = ledger.list_certificates(CertificateQuery(device_id=device, limit=1000)).items
    return [(c.serial, c.status) for c in certificates], ledger.device_owners([device])


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("caller", [OWNER, OTHER, ADMIN])
@pytest.mark.parametrize("scenario", SCENARIOS)
def test_only_the_owner_and_admins_certify_a_device(api, clock, scenario, caller, path):
    prepare, expected = SCENARIOS[scenario]
    device = "dev-lifecycle"
    attempt = prepare(api, clock, device)
    before = _device_state(api, device)
    serials_before = {serial for serial, _ in before[0]}
    outcome = PATHS[path](api, caller, device, attempt)
    want = expected[caller]
    if isinstance(want, int):
        assert outcome.status == want, outcome
        if want == 201:
            assert outcome.serial not in serials_before
            assert api.service.certificate(outcome.serial).status == "active"
        if want == 200:  # the device's active certificate again, and nothing new
            assert _device_state(api, device) == before
            assert api.service.certificate(outcome.serial).status == "active"
        return
    assert outcome.code == want, outcome
    assert _device_state(api, device) == before, "a refused request changed the ledger"
    if want == OWNED:
        assert outcome.status == 403
        for secret in (*serials_before, "factory-one", "factory-a"):
            assert secret.lower() not in outcome.message.lower(), outcome.message


def test_first_certificate_makes_the_owner(api):
    """The factory whose request first certified a device owns it, whatever happens to its certificates."""
    device = "dev-first"
    _first(api, device, by="factory-two")
    assert api.service.ledger.device_owners([device]) == {device: "factory-two"}
    api.service.sign_csr(make_csr(device), device, requested_by="admin", renew=True)  # an admin keeps the owner
    assert api.service.ledger.device_owners([device]) == {device: "factory-two"}
    refused = api.post_csr(device, make_csr(device), api.factory_a, renew="true")
    assert refused.status_code == 403 and refused.json()["error"]["code"] == OWNED
    allowed = api.post_csr(device, make_csr(device), api.factory_b, renew="true")
    assert allowed.status_code == 201


def test_another_factory_cannot_learn_which_device_holds_a_key(api):
    """A factory that sends a key already bound to a device it does not own learns no device ID."""
    key = device_key()
    _first(api, "dev-secret-name", key=key)
    response = api.post_csr("dev-mine", make_csr("dev-mine", key=key), api.factory_b)
    assert response.status_code == 409 and response.json()["error"]["code"] == "key-in-use"
    assert "dev-secret-name" not in response.text
    as_admin = api.post_csr("dev-mine", make_csr("dev-mine", key=key), api.admin)
    assert "dev-secret-name" in as_admin.json()["error"]["message"]


def test_the_ledger_itself_refuses_another_factorys_claim(api):
    """Two factories racing for a new device: the plan saw no owner, the store still lets only one win."""
    issued = api.service.sign_csr(make_csr("dev-race"), "dev-race", requested_by="factory-one")
    record = issued.record
    rival = dataclasses.replace(record, serial="0ABC", public_key_sha256="f" * 64, requested_by="factory-two")
    (outcome,) = api.service.ledger.record_issued([Issuance(rival, supersede=True, owner="factory-two")])
    assert isinstance(outcome, CaError) and outcome.code == OWNED
    assert api.service.certificate(record.serial).status == "active"


def test_two_factories_racing_in_one_process_the_loser_learns_only_the_owner_is_another(service):
    """Both runs read the ledger before either commits (one event loop, one group commit): the plans saw no
    owner, so the ledger's claim decides, and the loser hears the device is another factory's, not a serial."""

    async def main():
        return await asyncio.gather(
            *(
                service.sign_csr_async(
                    make_csr("dev-race"), "dev-race", requested_by=factory, allowed_intermediates=["factory-a"]
                )
                for factory in ("factory-one", "factory-two")
            ),
            return_exceptions=True,
        )

    outcomes = asyncio.run(main())
    (won,) = [outcome for outcome in outcomes if not isinstance(outcome, CaError)]
    (lost,) = [outcome for outcome in outcomes if isinstance(outcome, CaError)]
    assert (lost.status, lost.code) == (403, OWNED), lost
    assert won.record.serial not in lost.message and won.record.requested_by not in lost.message
    assert service.ledger.device_owners(["dev-race"]) == {"dev-race": won.record.requested_by}


# A batch asks for no renewal: the scenarios that do not renew, through the batch's chunk handler.
WITHOUT_RENEWAL = [name for name in SCENARIOS if "renewal" not in name and name != "an admin certified it first"]


@pytest.mark.parametrize("caller", [OWNER, OTHER, ADMIN])
@pytest.mark.parametrize("scenario", WITHOUT_RENEWAL)
def test_a_batch_item_follows_the_same_rules(api, clock, scenario, caller):
    prepare, expected = SCENARIOS[scenario]
    device = "dev-lifecycle"
    attempt = prepare(api, clock, device)
    assert not attempt.renew
    before = _device_state(api, device)
    options = _options(api, caller)
    batch = api.service.submit_batch([{"deviceId": device, "csr": attempt.csr.decode()}], **options)
    assert deliver_chunks(api.service) == 1
    (result,) = api.service.batch_results(batch.record.id, options["requested_by"]).results
    want = expected[caller]
    if isinstance(want, int):
        assert result.status == "issued" and result.issued.created == (want == 201), result
        assert api.service.certificate(result.issued.record.serial).status == "active"
        return
    assert result.error[0] == want, result
    assert _device_state(api, device) == before, "a refused item changed the ledger"
    if want == OWNED:
        for secret in {serial for serial, _ in before[0]} | {"factory-one", "factory-a"}:
            assert secret.lower() not in result.error[1].lower(), result.error


def test_every_signing_path_is_in_the_lifecycle_matrix():
    entry_points = {name for name in dir(DeviceCA) if name.startswith("sign") and not name.startswith("_")}
    batch = {"sign_batch_chunk"}  # test_a_batch_item_follows_the_same_rules
    assert entry_points <= set(PATHS) | batch, f"add {sorted(entry_points - set(PATHS) - batch)} to PATHS"


def _claim_devices(settings, factory: str, devices: list[str], barrier, results) -> None:
    """One process of the race: a factory asks for each device in turn, in small coalesced runs."""
    from shared.composition import build_service

    service = build_service(settings)
    try:
        barrier.wait()
        outcomes = []
        for start in range(0, len(devices), 4):
            batch = devices[start : start + 4]
            answers = service.sign_csrs(
                [SignRequest(make_csr(device), device) for device in batch],
                requested_by=factory,
                allowed_intermediates=["factory-a"],
            )
            outcomes += [
                (device, answer.status, answer.code, answer.message) if isinstance(answer, CaError) else (device, 201)
                for device, answer in zip(batch, answers, strict=True)
            ]
        results.put((factory, outcomes))
    finally:
        service.close()


@pytest.mark.child_process
def test_two_factory_processes_racing_for_new_devices(service):
    """Two processes claim the same new devices at once (one in the opposite order): each device has one
    owner, and the loser only ever hears that it belongs to another factory, never a serial."""
    service.principals.create_factory("factory-one", ["factory-a"])
    service.principals.create_factory("factory-two", ["factory-a"])
    devices = [f"dev-race-{n}" for n in range(120)]
    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(2), context.Queue()
    settings = service.settings
    processes = [
        context.Process(target=_claim_devices, args=(settings, "factory-one", devices, barrier, results)),
        context.Process(target=_claim_devices, args=(settings, "factory-two", devices[::-1], barrier, results)),
    ]
    for process in processes:
        process.start()
    outcomes = dict(results.get() for _ in processes)
    for process in processes:
        process.join()
    owners = service.ledger.device_owners(devices)
    for factory, answers in outcomes.items():
        for device, status, *refusal in answers:
            if status == 201:
                assert owners[device] == factory
            else:
                assert (status, refusal[0]) == (403, OWNED), (factory, device, refusal)
    assert len(owners) == len(devices)
    actives = service.ledger.active_certificates(devices)
    assert {device: record.requested_by for device, record in actives.items()} == owners
