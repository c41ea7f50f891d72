"""Group commit, request coalescing, and concurrent signing through the async path."""

import asyncio
import threading

import pytest

from shared.coalesce import Coalescer
from shared.errors import CaError, Conflict
from shared.ledger.groupcommit import GroupCommit
from shared.ledger.models import CertificateQuery
from shared.service import SignRequest

from .certrules import check_device, load_chain
from .csrs import device_key, make_csr


class RecordingStore:
    """A store that records each group it writes; fails groups holding 'boom'."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.lock = threading.Lock()

    def write(self, items: list[str]) -> list[str]:
        with self.lock:
            self.groups.append(list(items))
        if "boom" in items:
            raise RuntimeError("disk full")
        return [item.upper() for item in items]

    async def write_async(self, items: list[str]) -> list[str]:
        await asyncio.sleep(0)  # as a real write awaits its fsync
        return self.write(items)


def test_group_commit_from_threads():
    store = RecordingStore()
    commit = GroupCommit(store.write, store.write_async)
    results: dict[int, list[str]] = {}
    go = threading.Event()  # not a Barrier: a thread lost before it (mutmut's forked runs lost one) would hang it

    def submit(n: int) -> None:
        go.wait()
        results[n] = commit.submit([f"a{n}", f"b{n}"])

    threads = [threading.Thread(target=submit, args=(n,)) for n in range(20)]
    for thread in threads:
        thread.start()
    go.set()
    for thread in threads:
        thread.join()
    commit.close()
    assert results == {n: [f"A{n}", f"B{n}"] for n in range(20)}
    assert sum(len(group) for group in store.groups) == 40


def test_group_commit_error_reaches_every_member_of_its_group():
    store = RecordingStore()
    commit = GroupCommit(store.write, store.write_async)

    async def main():
        return await asyncio.gather(
            commit.submit_async(["x"]),
            commit.submit_async(["boom"]),
            commit.submit_async(["y"]),
            return_exceptions=True,
        )

    outcomes = asyncio.run(main())
    assert store.groups == [["x", "boom", "y"]]  # one group: the three were queued in one loop turn
    assert all(isinstance(outcome, RuntimeError) for outcome in outcomes)
    with pytest.raises(RuntimeError):
        commit.submit(["boom"])
    assert commit.submit(["z"]) == ["Z"]
    commit.close()


def test_group_commit_gathers_the_next_group_while_one_is_written():
    store = RecordingStore()
    commit = GroupCommit(store.write, store.write_async)

    async def main():
        first = asyncio.ensure_future(commit.submit_async(["a"]))
        await asyncio.sleep(0)  # the first group starts writing
        await asyncio.sleep(0)
        later = [commit.submit_async([f"b{n}"]) for n in range(5)]
        return await first, await asyncio.gather(*later)

    first, later = asyncio.run(main())
    assert first == ["A"] and later == [[f"B{n}"] for n in range(5)]
    assert store.groups == [["a"], ["b0", "b1", "b2", "b3", "b4"]]


class GatedStore(RecordingStore):
    """A store whose asynchronous write waits for the test to open a gate."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.writing = asyncio.Event()

        self.active = self.most_active = 0

    async def write_async(self, items: list[str]) -> list[str]:
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        self.writing.set()
        try:
            await self.gate.wait()
            return self.write(items)
        finally:
            self.active -= 1


def test_group_commit_writes_what_is_submitted_while_a_group_is_written():
    """Submissions made during a write form the next group as soon as the write ends: none is left waiting."""
    store = GatedStore()
    commit = GroupCommit(store.write, store.write_async)

    async def main():
        first = asyncio.ensure_future(commit.submit_async(["a"]))
        await store.writing.wait()  # the first group is being written
        during = [asyncio.ensure_future(commit.submit_async([f"b{n}"])) for n in range(3)]
        await asyncio.sleep(0)
        store.gate.set()
        await first
        for _ in range(20):  # enough turns of the loop for the next group to start and finish
            await asyncio.sleep(0)
        stranded = [future for future in during if not future.done()]
        for future in stranded:
            future.cancel()
        return await first, stranded, [future.result() for future in during if future.done()]

    first, stranded, during = asyncio.run(main())
    assert first == ["A"] and not stranded, "submissions made during a write were never written"
    assert during == [["B0"], ["B1"], ["B2"]]
    assert store.groups == [["a"], ["b0", "b1", "b2"]]


def test_a_loop_writes_one_group_at_a_time():
    """While a group is written, what arrives waits for it: a second write on the same loop would be a second
    transaction racing the first (SQLite has one writer)."""
    store = GatedStore()
    commit = GroupCommit(store.write, store.write_async)

    async def main():
        first = asyncio.ensure_future(commit.submit_async(["a"]))
        await store.writing.wait()
        during = [asyncio.ensure_future(commit.submit_async([f"b{n}"])) for n in range(3)]
        for _ in range(10):  # turns of the loop in which a second write could start
            await asyncio.sleep(0)
        store.gate.set()
        return await first, await asyncio.gather(*during)

    first, during = asyncio.run(main())
    assert store.most_active == 1
    assert first == ["A"] and during == [["B0"], ["B1"], ["B2"]]
    assert store.groups == [["a"], ["b0", "b1", "b2"]]


def test_the_writer_thread_gathers_what_was_queued_and_never_keeps_a_process_alive():
    """The thread writer takes everything queued behind a write as the next group, and is a daemon named
    ledger-writer (a command that forgot to close its ledger still exits; a thread dump names it)."""
    gate, writing = threading.Event(), threading.Event()
    store = RecordingStore()

    def write(items: list[str]) -> list[str]:
        writing.set()
        gate.wait()
        return store.write(items)

    commit = GroupCommit(write, store.write_async)
    first = commit.submit_future(["a"])
    writing.wait()
    later = [commit.submit_future([f"b{n}"]) for n in range(4)]
    writers = [thread for thread in threading.enumerate() if thread.name == "ledger-writer"]
    gate.set()
    assert first.result() == ["A"] and [future.result() for future in later] == [[f"B{n}"] for n in range(4)]
    commit.close()
    assert store.groups == [["a"], ["b0", "b1", "b2", "b3"]]
    assert writers and all(thread.daemon for thread in writers)


def test_coalescer_batches_by_kind_and_shares_errors():
    calls: list[tuple[str, list[int]]] = []

    async def handle(kind: str, items):
        calls.append((kind, list(items)))
        if kind == "bad":
            raise ValueError("refused")
        return [item * 10 for item in items]

    coalescer = Coalescer(handle)

    async def main():
        return await asyncio.gather(
            coalescer.submit("a", 1),
            coalescer.submit("b", 2),
            coalescer.submit("a", 3),
            coalescer.submit("bad", 4),
            return_exceptions=True,
        )

    outcomes = asyncio.run(main())
    assert outcomes[:3] == [10, 20, 30] and isinstance(outcomes[3], ValueError)
    assert sorted(calls) == [("a", [1, 3]), ("b", [2]), ("bad", [4])]


def test_concurrent_async_signing(service):
    async def main():
        return await asyncio.gather(
            *(service.sign_csr_async(make_csr(f"dev-{n}"), f"dev-{n}", requested_by="t") for n in range(40))
        )

    issued = asyncio.run(main())
    assert all(result.created for result in issued)
    assert len({result.record.serial for result in issued}) == 40
    assert len(service.ledger.list_certificates(CertificateQuery(limit=100)).items) == 40


def test_concurrent_requests_for_one_device(service):
    """Different keys at once: exactly one wins. The same key at once: both get the same certificate."""
    key = device_key()
    same = make_csr("dev-same", key=key)

    async def main():
        return await asyncio.gather(
            *(service.sign_csr_async(make_csr("dev-race"), "dev-race") for _ in range(5)),
            service.sign_csr_async(same, "dev-same"),
            service.sign_csr_async(make_csr("dev-same", key=key), "dev-same"),
            return_exceptions=True,
        )

    *race, first, second = asyncio.run(main())
    assert sum(not isinstance(r, CaError) for r in race) == 1
    assert all(isinstance(r, Conflict) and r.code == "device-has-certificate" for r in race if isinstance(r, CaError))
    assert first.record.serial == second.record.serial and {first.created, second.created} == {True, False}
    assert len(service.ledger.list_certificates(CertificateQuery(limit=100)).items) == 2


def test_a_request_answered_with_a_racing_twins_certificate_gets_that_certificates_chain(service):
    """The same key for one new device, asked at once with two intermediates: both runs sign, one commit wins,
    and the other is answered with the winner's certificate, chained to the intermediate that signed it."""
    service.create_intermediate("factory-b")
    key = device_key()

    async def main():
        return await asyncio.gather(
            *(
                service.sign_csr_async(make_csr("dev-1", key=key), "dev-1", intermediate_id=ca_id)
                for ca_id in ("factory-a", "factory-b")
            )
        )

    answers = asyncio.run(main())
    assert answers[0].record == answers[1].record and sorted(a.created for a in answers) == [False, True]
    for answer in answers:
        assert answer.intermediate_pem == service.intermediate(answer.record.intermediate_id).certificate_pem
        device, intermediate = load_chain(answer.chain_pem)
        check_device(device, intermediate, "dev-1")


def test_async_signing_errors_are_per_request(service):
    async def main():
        return await asyncio.gather(
            service.sign_csr_async(make_csr("dev-ok"), "dev-ok"),
            service.sign_csr_async(make_csr("someone-else"), "dev-bad"),
            service.sign_csr_async(make_csr("dev-x"), "dev-x", intermediate_id="nope"),
            return_exceptions=True,
        )

    ok, bad, unknown = asyncio.run(main())
    assert ok.created
    assert isinstance(bad, CaError) and bad.code == "cn-mismatch"
    assert isinstance(unknown, CaError) and unknown.code == "intermediate-not-found"


def test_signing_without_a_requester_records_cli(service):
    """Without requested_by a certificate is recorded as requested by "cli", however it is signed."""

    async def main():
        return await asyncio.gather(
            service.sign_csr_async(make_csr("dev-1"), "dev-1"),
            service.sign_csr_async(make_csr("dev-2"), "dev-2", requested_by="line-1"),
        )

    unnamed, named = asyncio.run(main())
    assert [service.certificate(r.record.serial).requested_by for r in (unnamed, named)] == ["cli", "line-1"]
    assert service.sign_csr(make_csr("dev-3"), "dev-3").record.requested_by == "cli"
    (batched,) = service.sign_csrs([SignRequest(make_csr("dev-4"), "dev-4")])
    assert service.certificate(batched.record.serial).requested_by == "cli"
