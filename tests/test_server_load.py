"""Load: 16 concurrent client processes × 1000 requests each, no error, no leaked connection.

The model is the harmonic-trap reference bundle (no neighbor list), so the test
measures the server and not the model.
"""

from __future__ import annotations

import subprocess
import sys
import threading

import numpy as np
import pytest

from server_support import client_for, ethanol, open_fds, running_server, wait_for
from spkserve.batch import Structure

N_CLIENTS = 16
N_REQUESTS = 1000
N_VARIANTS = 4

_CLIENT = r"""
import sys
import numpy as np
from spkserve.server.client import Client
path, infile, outfile, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
data = np.load(infile)
numbers, positions = data["numbers"], data["positions"]          # [V, 9], [V, 9, 3]
energies = np.empty(n)
fsum = np.empty(n)
with Client(unix=path, reconnect_attempts=0, timeout_s=120) as c:
    for i in range(n):
        v = i % len(numbers)
        r = c.compute({"numbers": numbers[v], "positions": positions[v]})
        energies[i] = r["energy"]
        fsum[i] = np.abs(r["forces"]).sum()
np.savez(outfile, energies=energies, fsum=fsum)
"""


@pytest.fixture
def one_torch_thread():
    import torch

    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.timeout(300)
def test_sixteen_clients_thousand_requests_each(trap_bundle, tmp_path, one_torch_thread):
    from spkserve.runtime import ModelRunner

    runner = ModelRunner(trap_bundle, skin_angstrom=0.0)
    variants = [[ethanol(seed=1000 * k + v, scale=1.2) for v in range(N_VARIANTS)] for k in range(N_CLIENTS)]
    for k, vs in enumerate(variants):
        np.savez(tmp_path / f"in{k}.npz", numbers=np.stack([a.numbers for a in vs]),
                 positions=np.stack([a.positions for a in vs]))
    fds_before, threads_before = open_fds(), threading.active_count()

    with running_server(trap_bundle, batch_window_us=500, torch_threads=1) as srv:
        fds_serving = open_fds()
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", _CLIENT, srv.address, str(tmp_path / f"in{k}.npz"),
                 str(tmp_path / f"out{k}.npz"), str(N_REQUESTS)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            )
            for k in range(N_CLIENTS)
        ]
        try:
            outputs = [p.communicate(timeout=280) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        for p, (_, err) in zip(procs, outputs):
            assert p.returncode == 0, err
        wait_for(lambda: srv.stats.connections_open == 0, 10, "all client connections to close")
        assert open_fds() == fds_serving  # nothing left open by 16 finished clients
        stats = client_for(srv).stats()

    assert open_fds() == fds_before, "server left file descriptors open"
    wait_for(lambda: threading.active_count() == threads_before, 10, "server threads to end")

    assert stats["requests_by_op"]["compute"] == N_CLIENTS * N_REQUESTS
    assert stats["errors"] == 0 and stats["connections"]["total"] == N_CLIENTS + 1
    assert stats["mean_batch_requests"] > 1, "concurrent clients never shared a model call"
    for k in range(N_CLIENTS):
        ref = runner.compute([Structure.from_atoms(a) for a in variants[k]], ("energy", "forces"))
        e_ref = ref["energy"].numpy()
        f_ref = np.abs(ref["forces"].numpy()).reshape(N_VARIANTS, -1).sum(axis=1)
        out = np.load(tmp_path / f"out{k}.npz")
        idx = np.arange(N_REQUESTS) % N_VARIANTS
        np.testing.assert_allclose(out["energies"], e_ref[idx], rtol=1e-12)
        np.testing.assert_allclose(out["fsum"], f_ref[idx], rtol=1e-12)
    print(f"\nload: {stats['batches']} batches, mean {stats['mean_batch_requests']:.2f} requests per batch, "
          f"latency p50/p90/p99 {stats['latency_ms']['p50']:.2f}/{stats['latency_ms']['p90']:.2f}/"
          f"{stats['latency_ms']['p99']:.2f} ms")
