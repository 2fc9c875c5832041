"""Counters and latency percentiles of the model server (touched from the event loop only)."""

from __future__ import annotations

import time
from collections import Counter, deque

import numpy as np


class ServerStats:
    """Requests, batches, batch sizes, errors and compute latencies.

    Latencies (ms, from a request fully read to its reply ready) are kept for
    the last ``window`` compute requests; percentiles are over that window.
    """

    def __init__(self, window: int = 100_000) -> None:
        self.started = time.monotonic()
        self.requests: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()
        self.structures = 0
        self.batches = 0
        self.batched_requests = 0
        self.batched_structures = 0
        self.batched_atoms = 0
        self.model_seconds = 0.0
        self.max_batch_requests = 0
        self.connections_total = 0
        self.connections_open = 0
        self.connections_refused = 0
        self._latency_ms: deque[float] = deque(maxlen=window)

    def record_request(self, op: str) -> None:
        self.requests[op] += 1

    def record_error(self, code: str) -> None:
        self.errors[code] += 1

    def record_latency(self, seconds: float) -> None:
        self._latency_ms.append(seconds * 1e3)

    def record_batch(self, n_requests: int, n_structures: int, n_atoms: int, seconds: float) -> None:
        self.batches += 1
        self.batched_requests += n_requests
        self.batched_structures += n_structures
        self.batched_atoms += n_atoms
        self.model_seconds += seconds
        self.max_batch_requests = max(self.max_batch_requests, n_requests)

    def snapshot(self) -> dict:
        """Plain dict for the ``stats`` reply."""
        lat = np.asarray(self._latency_ms, dtype=np.float64)
        if lat.size:
            p50, p90, p99 = (float(v) for v in np.percentile(lat, [50, 90, 99]))
            mean = float(lat.mean())
        else:
            p50 = p90 = p99 = mean = None
        b = max(self.batches, 1)
        return {
            "uptime_s": time.monotonic() - self.started,
            "requests": int(sum(self.requests.values())),
            "requests_by_op": dict(self.requests),
            "errors": int(sum(self.errors.values())),
            "errors_by_code": dict(self.errors),
            "structures": self.batched_structures,
            "batches": self.batches,
            "mean_batch_requests": self.batched_requests / b if self.batches else None,
            "mean_batch_structures": self.batched_structures / b if self.batches else None,
            "mean_batch_atoms": self.batched_atoms / b if self.batches else None,
            "max_batch_requests": self.max_batch_requests,
            "model_seconds": self.model_seconds,
            "latency_ms": {"p50": p50, "p90": p90, "p99": p99, "mean": mean, "count": int(lat.size)},
            "connections": {
                "open": self.connections_open,
                "total": self.connections_total,
                "refused": self.connections_refused,
            },
        }
