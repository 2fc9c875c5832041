"""Dynamic batching: compute requests that arrive close together share one model call.

The batcher lives on the server's event loop; the model runs in one worker
thread so that sockets keep being served while it computes. A batch starts
with the oldest waiting request and takes every later request that asks for
the same properties, until ``max_batch_atoms`` (a single larger request runs
alone) or ``max_batch_requests`` is reached. It waits at most ``window_us``
after the oldest request arrived for more to come, and not at all when no
other connected client could still send one (each connection has at most one
request in flight). While the model is busy, new requests queue up and form
the next batch.

The wait adapts to how clients behave: after :data:`FUTILE_LIMIT` windows in a
row that expired with nobody joining (clients that take turns, e.g. the images
of an ASE NEB on one thread), requests stop waiting, except one in
:data:`PROBE_EVERY` that still probes; as soon as requests queue up together
again (a batch of more than one forms), waiting resumes.

If a merged batch fails, each of its requests is evaluated alone, so an error
reaches only the request that caused it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

log = logging.getLogger("spkserve.server")

#: windows in a row that expire without company before waiting is switched off
FUTILE_LIMIT = 8
#: while switched off, one request in this many still waits (to notice concurrency)
PROBE_EVERY = 16

#: evaluate(structures, properties) -> one dict of results per structure
EvaluateFn = Callable[[Sequence[Any], tuple[str, ...]], list[dict]]


@dataclass
class _Item:
    structures: list
    n_atoms: int
    properties: tuple[str, ...]
    future: asyncio.Future
    arrival: float = field(default_factory=time.monotonic)


class DynamicBatcher:
    """Queue of compute requests in front of one model worker thread.

    Args:
        evaluate: runs in the worker thread; must return one result per structure.
        window_us: how long (µs) the oldest request may wait for company; 0 disables waiting.
        max_batch_atoms: atoms per model call (a larger single request still runs, alone).
        max_batch_requests: requests per model call; 1 turns batching off.
        idle_clients: number of connected clients that could still send a request
            now (the batcher stops waiting when it is 0); None = always wait the window.
        on_batch: callback(n_requests, n_structures, n_atoms, seconds) after every model call.
    """

    def __init__(
        self,
        evaluate: EvaluateFn,
        *,
        window_us: float = 500.0,
        max_batch_atoms: int = 20_000,
        max_batch_requests: int | None = None,
        idle_clients: Callable[[], int] | None = None,
        on_batch: Callable[[int, int, int, float], None] | None = None,
    ) -> None:
        if window_us < 0:
            raise ValueError(f"window_us must be >= 0, got {window_us}")
        if max_batch_atoms < 1:
            raise ValueError(f"max_batch_atoms must be >= 1, got {max_batch_atoms}")
        if max_batch_requests is not None and max_batch_requests < 1:
            raise ValueError(f"max_batch_requests must be >= 1 or None, got {max_batch_requests}")
        self._evaluate = evaluate
        self._window_s = window_us * 1e-6
        self._max_atoms = max_batch_atoms
        self._max_requests = max_batch_requests or 2**62
        self._idle_clients = idle_clients
        self._on_batch = on_batch
        self._pending: deque[_Item] = deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._closing = False
        self._futile = 0  # windows in a row that expired with nobody joining
        self._skipped = 0  # requests that did not wait since the last probe
        #: how many requests waited for company, and how many of those windows expired
        self.window_waits = 0
        self.window_expired = 0

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        """Start the batching task on the running loop and the worker thread."""
        self._wake = asyncio.Event()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="spkserve-model")
        self._task = asyncio.get_running_loop().create_task(self._run(), name="spkserve-batcher")

    async def close(self) -> None:
        """Finish every queued request, then stop the task and the worker thread."""
        self._closing = True
        if self._wake is not None:
            self._wake.set()
        if self._task is not None:
            await self._task
        if self._executor is not None:
            self._executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return len(self._pending)

    # ------------------------------------------------------------------ API
    def submit(self, structures: list, n_atoms: int, properties: tuple[str, ...]) -> asyncio.Future:
        """Queue a request; the future resolves to one result dict per structure.

        Cancelling the future (e.g. on a timeout) drops the request if it has
        not reached the model yet.
        """
        if self._closing and self._task is not None and self._task.done():
            raise RuntimeError("batcher is closed")
        fut = asyncio.get_running_loop().create_future()
        self._pending.append(_Item(structures, n_atoms, properties, fut))
        self._wake.set()
        return fut

    # ------------------------------------------------------------------ internals
    def _compatible(self, first: _Item):
        for it in self._pending:
            if not it.future.done() and it.properties == first.properties:
                yield it

    def _full(self, first: _Item) -> bool:
        atoms = n = 0
        for it in self._compatible(first):
            atoms += it.n_atoms
            n += 1
            if atoms >= self._max_atoms or n >= self._max_requests:
                return True
        return False

    def _take(self, first: _Item) -> list[_Item]:
        batch: list[_Item] = []
        atoms = 0
        keep: deque[_Item] = deque()
        for it in self._pending:
            if it.future.done():  # cancelled by a timeout or a closed connection
                continue
            fits = (
                it.properties == first.properties
                and len(batch) < self._max_requests
                and (not batch or atoms + it.n_atoms <= self._max_atoms)
            )
            if fits:
                batch.append(it)
                atoms += it.n_atoms
            else:
                keep.append(it)
        self._pending = keep
        return batch

    async def _wait_for_company(self, first: _Item) -> bool:
        """Wait for more requests; True if the window expired (rather than filled up)."""
        loop = asyncio.get_running_loop()
        end = loop.time() + max(0.0, self._window_s - (time.monotonic() - first.arrival))
        while not self._closing and not self._full(first):
            if self._idle_clients is not None and self._idle_clients() <= 0:
                return False
            remaining = end - loop.time()
            if remaining <= 0:
                return True
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), remaining)
            except asyncio.TimeoutError:
                return True
        return False

    def _should_wait(self) -> bool:
        if self._window_s <= 0 or self._max_requests <= 1:
            return False
        if self._futile < FUTILE_LIMIT:
            return True
        self._skipped += 1
        if self._skipped >= PROBE_EVERY:
            self._skipped = 0
            return True
        return False

    async def _run(self) -> None:
        while True:
            while not any(not it.future.done() for it in self._pending):
                self._pending.clear()
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
            first = next(it for it in self._pending if not it.future.done())
            expired = False
            if self._should_wait():
                self.window_waits += 1
                expired = await self._wait_for_company(first)
                self.window_expired += int(expired)
            batch = self._take(first)
            if len(batch) > 1:
                self._futile = 0
            elif expired and batch:
                self._futile += 1
            if batch:
                await self._run_batch(batch)

    async def _call_model(self, items: list[_Item]) -> list[dict]:
        structures = [s for it in items for s in it.structures]
        loop = asyncio.get_running_loop()
        t0 = time.perf_counter()
        try:
            return await loop.run_in_executor(self._executor, self._evaluate, structures, items[0].properties)
        finally:
            if self._on_batch is not None:
                self._on_batch(len(items), len(structures), sum(it.n_atoms for it in items), time.perf_counter() - t0)

    @staticmethod
    def _deliver(items: list[_Item], results: list[dict]) -> None:
        k = 0
        for it in items:
            n = len(it.structures)
            if not it.future.done():
                it.future.set_result(results[k : k + n])
            k += n

    async def _run_batch(self, batch: list[_Item]) -> None:
        try:
            results = await self._call_model(batch)
        except Exception as err:  # noqa: BLE001 - reported to the request(s) that caused it
            if len(batch) == 1:
                if not batch[0].future.done():
                    batch[0].future.set_exception(err)
                return
            log.info("batch of %d requests failed (%s); evaluating them one by one", len(batch), err)
            for it in batch:
                if it.future.done():
                    continue
                try:
                    res = await self._call_model([it])
                except Exception as one_err:  # noqa: BLE001
                    if not it.future.done():
                        it.future.set_exception(one_err)
                else:
                    self._deliver([it], res)
            return
        self._deliver(batch, results)
