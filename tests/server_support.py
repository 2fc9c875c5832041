"""Helpers for the model-server tests: servers on short unix paths, structures, leak counters."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

import numpy as np


@contextlib.contextmanager
def short_tmpdir() -> Iterator[Path]:
    """A fresh directory with a short path (unix socket paths are limited to ~100 bytes)."""
    d = Path(tempfile.mkdtemp(prefix="spks", dir="/tmp"))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def running_server(bundle=None, *, runner=None, info=None, **config) -> Iterator:
    """A ModelServer on a unix socket in a short tmp dir (or TCP if host= is given); always shut down."""
    from spkserve.server.server import ModelServer

    with short_tmpdir() as d:
        if "host" not in config and "unix_path" not in config:
            config["unix_path"] = str(d / "s.sock")
        if runner is not None:
            server = ModelServer(runner, info, **config)
        else:
            server = ModelServer.from_bundle(bundle, **config)
        server.start(timeout_s=60)
        try:
            yield server
        finally:
            server.shutdown(timeout_s=60)


def client_for(server, **kw):
    from spkserve.server.client import Client

    addr = server.address
    if isinstance(addr, str):
        return Client(unix=addr, **kw)
    return Client(host=addr[0], port=addr[1], token=server.config.token, **kw)


def ethanol(seed: int | None = None, scale: float = 1.0):
    """Ethanol (ASE G2 geometry), optionally rattled (seeded) and scaled."""
    from ase.build import molecule

    atoms = molecule("CH3CH2OH")
    atoms.positions *= scale
    if seed is not None:
        atoms.rattle(0.05, seed=seed)
    return atoms


def argon_cluster(n: int, seed: int, spacing: float = 3.8):
    """n Ar atoms on a jittered cubic grid (no overlaps)."""
    from ase import Atoms

    rng = np.random.default_rng(seed)
    side = int(np.ceil(n ** (1 / 3)))
    grid = np.array([(i, j, k) for i in range(side) for j in range(side) for k in range(side)], float)[:n]
    return Atoms("Ar%d" % n, positions=grid * spacing + rng.normal(0, 0.1, (n, 3)))


def argon_crystal(seed: int):
    """Periodic fcc Ar (32 atoms), rattled."""
    from ase.build import bulk

    atoms = bulk("Ar", "fcc", a=5.3, cubic=True).repeat((2, 2, 2))
    atoms.rattle(0.05, seed=seed)
    return atoms


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def wait_for(predicate, timeout_s: float = 10.0, what: str = "condition") -> None:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out after {timeout_s} s waiting for {what}")


class SlowRunner:
    """Wraps a runner and sleeps before every model call (to hold requests in flight)."""

    def __init__(self, runner, delay_s: float) -> None:
        self.runner = runner
        self.delay_s = delay_s
        self.available_properties = runner.available_properties
        self.calls = 0
        self.started = threading.Event()

    def compute(self, structures, properties=("energy", "forces")):
        self.calls += 1
        self.started.set()
        time.sleep(self.delay_s)
        return self.runner.compute(structures, properties)

    def close(self) -> None:
        pass
