"""Group commit: what concurrent callers ask to write goes to the store together, in one durable commit.

Threads: one writer thread takes everything queued, writes it in one transaction and hands each caller
its own results (or the group's error). Coroutines: the first to queue schedules a flush on its event
loop (`call_soon`), which runs once the requests already in hand have queued theirs too; while a group
is being written the next one gathers. The coroutine writer does the statements on the loop (a writer
thread would need the GIL back a dozen times per transaction from a busy loop). Either way one fsync
carries many certificates under load, and no caller waits for a timer.
"""

import asyncio
import queue
import threading
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

Item = TypeVar("Item")
Result = TypeVar("Result")
_STOP = object()


class GroupCommit(Generic[Item, Result]):
    def __init__(
        self,
        write: Callable[[list[Item]], list[Result]],
        write_async: Callable[[list[Item]], Awaitable[list[Result]]],
        name: str = "ledger-writer",
    ) -> None:
        """`write` and `write_async` store a list of items in one transaction and return one result per
        item, in order; `write_async` runs on the event loop."""
        self._write = write
        self._write_async = write_async
        self._name = name
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._loops: dict[asyncio.AbstractEventLoop, _LoopState] = {}

    def submit(self, items: Sequence[Item]) -> list[Result]:
        return self.submit_future(items).result()

    async def submit_async(self, items: Sequence[Item]) -> list[Result]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Result]] = loop.create_future()
        state = self._loops.setdefault(loop, _LoopState())
        state.batch.append((list(items), future))
        if not state.writing and not state.scheduled:
            state.scheduled = True
            loop.call_soon(self._start_loop_group, loop, state)
        return await future

    def _start_loop_group(self, loop: asyncio.AbstractEventLoop, state: "_LoopState") -> None:
        state.scheduled = False
        if state.writing or not state.batch:
            return
        state.writing = True
        group, state.batch = state.batch, []
        loop.create_task(self._write_loop_group(loop, state, group))

    async def _write_loop_group(
        self, loop: asyncio.AbstractEventLoop, state: "_LoopState", group: list[tuple[list[Item], Any]]
    ) -> None:
        try:
            results = await self._write_async([item for items, _ in group for item in items])
        except Exception as error:
            results, failure = [], error
        else:
            failure = None
        finally:
            state.writing = False
            if state.batch and not state.scheduled:
                state.scheduled = True
                loop.call_soon(self._start_loop_group, loop, state)
        _settle(group, results, failure)

    def submit_future(self, items: Sequence[Item]) -> "Future[list[Result]]":
        future: Future[list[Result]] = Future()
        self._ensure_writer()
        self._queue.put((list(items), future))
        return future

    def close(self) -> None:
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(_STOP)
            thread.join()

    def _ensure_writer(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
                    self._thread.start()

    def _run(self) -> None:
        while True:
            first = self._queue.get()
            if first is _STOP:
                return
            group = [first]
            while True:
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is _STOP:
                    self._queue.put(_STOP)  # finish this group, then stop
                    break
                group.append(more)
            self._write_group(group)

    def _write_group(self, group: list[tuple[list[Item], Any]]) -> None:
        try:
            results = self._write([item for items, _ in group for item in items])
        except Exception as error:
            _settle(group, [], error)
        else:
            _settle(group, results, None)


@dataclass
class _LoopState:
    batch: list = field(default_factory=list)
    scheduled: bool = False
    writing: bool = False


def _settle(group: list[tuple[list, Any]], results: list, failure: Exception | None) -> None:
    """Hand each member its results, or the group's error (futures: concurrent or asyncio, same methods)."""
    start = 0
    for items, future in group:
        if not future.done():  # an awaiting coroutine may have been cancelled
            if failure is not None:
                future.set_exception(failure)
            else:
                future.set_result(results[start : start + len(items)])
        start += len(items)
