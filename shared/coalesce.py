"""Coalescing: concurrent coroutines asking for the same kind of work get it done in one call.

The first request of a kind schedules one flush on the event loop (`call_soon`), which runs once the
requests already in hand have queued theirs too; everything queued by then is handled in one batch call
per kind. Under load batches grow by themselves; a lone request waits for no timer.
"""

import asyncio
from collections.abc import Awaitable, Callable, Hashable, Sequence
from typing import Generic, TypeVar

Kind = TypeVar("Kind", bound=Hashable)
Item = TypeVar("Item")
Result = TypeVar("Result")


class Coalescer(Generic[Kind, Item, Result]):
    def __init__(self, handle: Callable[[Kind, Sequence[Item]], Awaitable[list[Result]]]) -> None:
        """`handle(kind, items)` returns one result per item, in order; if it raises, every item gets the error."""
        self._handle = handle
        self._pending: dict[asyncio.AbstractEventLoop, dict[Kind, list[tuple[Item, asyncio.Future]]]] = {}

    async def submit(self, kind: Kind, item: Item) -> Result:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[Result] = loop.create_future()
        pending = self._pending.get(loop)
        if pending is None:
            pending = self._pending[loop] = {}
            loop.call_soon(self._flush, loop)
        pending.setdefault(kind, []).append((item, future))
        return await future

    def _flush(self, loop: asyncio.AbstractEventLoop) -> None:
        for kind, queued in self._pending.pop(loop).items():
            loop.create_task(self._run(kind, queued))

    async def _run(self, kind: Kind, queued: list[tuple[Item, asyncio.Future]]) -> None:
        try:
            results = await self._handle(kind, [item for item, _ in queued])
        except Exception as error:
            for _, future in queued:
                if not future.done():
                    future.set_exception(error)
            return
        for (_, future), result in zip(queued, results, strict=True):
            if not future.done():
                future.set_result(result)
