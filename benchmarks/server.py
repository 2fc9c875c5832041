"""msgpack model server: throughput with 1/4/16 concurrent clients (batching on/off) and per-call overhead.

    .venv/bin/python benchmarks/server.py                  # writes benchmarks/results/server.md
    .venv/bin/python benchmarks/server.py --quick          # fewer requests, for a smoke run

Models: ``spkserve/data/ethanol-painn.bundle`` if it exists, a randomly initialised PaiNN (128 features, 3 interactions, cutoff 5 Å,
``spkserve.nn.models.painn_energy_model``, float32) and the LJ reference bundle
(σ 3.4 Å, ε 0.0104 eV, rc 8.5 Å, float64), both on ethanol (9 atoms).

Every server is a separate process running :class:`ModelServer` with the settings of
``spkserve serve --torch-threads 1`` (the PaiNN is held in memory, not read from a file);
every client is a separate process that connects, warms up, waits for a common
start signal, then sends its requests back to back (energy + forces). Throughput =
all requests / (last client end − first client start). Per-call overhead =
median(client round trip) − median(in-process ``ModelRunner.compute``), measured
interleaved (A B A B ...) in one process with one torch thread.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
PY = sys.executable

_CLIENT = r"""
import sys, time
import numpy as np
from spkserve.server.client import Client
path, n, go = sys.argv[1], int(sys.argv[2]), sys.argv[3]
d = np.load(sys.argv[4])
s = {"numbers": d["numbers"], "positions": d["positions"]}
with Client(unix=path, timeout_s=600) as c:
    for _ in range(5):
        c.compute(s)
    print("ready", flush=True)
    while not __import__("os").path.exists(go):
        time.sleep(0.001)
    t0 = time.time()
    for _ in range(n):
        c.compute(s)
    t1 = time.time()
print(t0, t1, flush=True)
"""


PAINN_META = {
    "species": [1, 6, 7, 8],
    "cutoff": 5.0,
    "units": {"length": "Angstrom", "energy": "eV"},
    "outputs": {"energy": {"unit": "eV", "per": "system"}, "forces": {"unit": "eV/Angstrom", "per": "atom"},
                "stress": {"unit": "eV/Angstrom^3", "per": "system"}},
    "dtype": "float32",
    "provenance": {"description": "randomly initialised PaiNN for benchmarks (seed 0)"},
}


def make_runner(kind: str, path: str):
    """A ModelRunner for the LJ bundle file, or for a seeded random PaiNN.

    The PaiNN is wrapped in a LoadedBundle in memory: writing it as a bundle
    currently fails (0-d buffers in the safetensors hash), see the report.
    """
    import torch

    from spkserve.runtime import ModelRunner

    if kind in ("lj", "file"):
        return ModelRunner(path)
    from spkserve.bundle import LoadedBundle
    from spkserve.nn.models import painn_energy_model

    torch.manual_seed(0)
    model = painn_energy_model(cutoff=5.0, n_atom_basis=128, n_interactions=3).to(torch.float32).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return ModelRunner(LoadedBundle(model, PAINN_META, model.architecture_spec))


_SERVER = r"""
import sys
sys.path.insert(0, sys.argv[5])
from server import make_runner
from spkserve.server.server import ModelServer
kind, path, sock, batching = sys.argv[1:5]
runner = make_runner(kind, path)
info = {"species": runner.bundle.species, "cutoff_angstrom": runner.cutoff_angstrom}
ModelServer(runner, info, unix_path=sock, torch_threads=1, batch_window_us=500,
            max_batch_requests=None if batching == "1" else 1).serve_forever()
"""


def start_server(kind: str, bundle: Path, sock: Path, batching: bool) -> subprocess.Popen:
    """Same settings as ``spkserve serve BUNDLE --unix SOCK --torch-threads 1 [--no-batching]``."""
    cmd = [PY, "-c", _SERVER, kind, str(bundle), str(sock), "1" if batching else "0", str(ROOT / "benchmarks")]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True)
    end = time.monotonic() + 120
    while not sock.exists():
        if proc.poll() is not None or time.monotonic() > end:
            raise RuntimeError(f"server did not start: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")
        time.sleep(0.05)
    return proc


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def throughput(sock: Path, n_clients: int, n_requests: int, structure: Path, d: Path) -> float:
    go = d / f"go-{time.monotonic_ns()}"
    procs = [subprocess.Popen([PY, "-c", _CLIENT, str(sock), str(n_requests), str(go), str(structure)],
                              stdout=subprocess.PIPE, text=True) for _ in range(n_clients)]
    for p in procs:
        if p.stdout.readline().strip() != "ready":
            raise RuntimeError("client failed to start")
    go.touch()
    spans = []
    for p in procs:
        out, _ = p.communicate(timeout=1200)
        if p.returncode != 0:
            raise RuntimeError("client failed")
        spans.append([float(x) for x in out.split()])
    spans = np.array(spans)
    return n_clients * n_requests / (spans[:, 1].max() - spans[:, 0].min())


def _proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of a process (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def overhead(kind: str, bundle: Path, sock: Path, n_calls: int, repeats: int, server_pid: int) -> dict[str, float]:
    import torch

    from ase.build import molecule

    from spkserve.batch import Structure
    from spkserve.server.client import Client

    torch.set_num_threads(1)
    atoms = molecule("CH3CH2OH")
    runner = make_runner(kind, str(bundle))
    s = [Structure.from_atoms(atoms)]
    local, remote, local_cpu, remote_cpu = [], [], [], []
    with Client(unix=str(sock)) as c:
        for _ in range(10):
            runner.compute(s)
            c.compute(atoms)
        for _ in range(repeats):
            t, cpu = time.perf_counter(), time.process_time()
            for _ in range(n_calls):
                runner.compute(s)
            local.append((time.perf_counter() - t) / n_calls)
            local_cpu.append((time.process_time() - cpu) / n_calls)
            t, cpu, scpu = time.perf_counter(), time.process_time(), _proc_cpu_s(server_pid)
            for _ in range(n_calls):
                c.compute(atoms)
            remote.append((time.perf_counter() - t) / n_calls)
            remote_cpu.append((time.process_time() - cpu + _proc_cpu_s(server_pid) - scpu) / n_calls)
    diffs = [r - l for r, l in zip(remote, local)]
    cpu_diffs = [r - l for r, l in zip(remote_cpu, local_cpu)]
    return {
        "cpu_overhead_us": statistics.median(cpu_diffs) * 1e6,
        "cpu_overhead_min_us": min(cpu_diffs) * 1e6,
        "cpu_overhead_max_us": max(cpu_diffs) * 1e6,
        "in_process_ms": statistics.median(local) * 1e3,
        "remote_ms": statistics.median(remote) * 1e3,
        "overhead_us": statistics.median(diffs) * 1e6,
        "overhead_min_us": min(diffs) * 1e6,
        "overhead_max_us": max(diffs) * 1e6,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="few requests (smoke run)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "server.md")
    args = ap.parse_args()
    reps = 1 if args.quick else args.repeats
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    lines = []
    with tempfile.TemporaryDirectory(prefix="spkb", dir="/tmp") as tmp:
        d = Path(tmp)
        from ase.build import molecule

        atoms = molecule("CH3CH2OH")
        np.savez(d / "ethanol.npz", numbers=atoms.numbers, positions=atoms.positions)
        from spkserve.potentials import reference_bundle

        lj = reference_bundle("lj", d / "lj.bundle", sigma=3.4, epsilon=0.0104, cutoff=8.5)
        models = [("PaiNN (random, float32)", "painn", d / "none"), ("LJ reference (float64)", "lj", lj)]
        trained = ROOT / "spkserve" / "data" / "ethanol-painn.bundle"
        if trained.is_file():  # the shipped trained model, when it exists
            models.insert(0, ("PaiNN trained on ethanol (spkserve/data/ethanol-painn.bundle)", "file", trained))
        rows, over_rows = [], []
        for name, kind, bundle in models:
            # per-call overhead against in-process evaluation
            sock = d / "o.sock"
            proc = start_server(kind, bundle, sock, batching=True)
            try:
                ov = overhead(kind, bundle, sock, n_calls=50 if args.quick else 200, repeats=max(reps, 3), server_pid=proc.pid)
            finally:
                stop_server(proc)
            over_rows.append((name, ov))
            print(name, ov, flush=True)
            # throughput, batching on/off interleaved per repeat
            results: dict[tuple[int, bool], list[float]] = {}
            for _ in range(reps):
                for n_clients in (1, 4, 16):
                    n_req = max(10, (100 if args.quick else 400) // n_clients)
                    for batching in (True, False):
                        sock = d / f"t{int(batching)}.sock"
                        proc = start_server(kind, bundle, sock, batching)
                        try:
                            rate = throughput(sock, n_clients, n_req, d / "ethanol.npz", d)
                        finally:
                            stop_server(proc)
                        results.setdefault((n_clients, batching), []).append(rate)
                        print(name, n_clients, "batching" if batching else "no batching", f"{rate:.0f}/s", flush=True)
            rows.append((name, results))
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    lines.append("# msgpack model server: throughput and per-call overhead\n")
    lines.append(f"Command: `.venv/bin/python benchmarks/server.py{' --quick' if args.quick else ''}` "
                 f"({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}).\n")
    lines.append(f"Machine: {os.cpu_count()} cores shared with other jobs; /proc/loadavg before "
                 f"{' '.join(load_before)}, after {' '.join(load_after)}. Figures are noisy: compare ratios "
                 "within one table, not absolute values across runs.\n")
    lines.append("System: ethanol (9 atoms), energy + forces, one structure per request. Server: `spkserve serve "
                 "--torch-threads 1` (window 500 µs, or `--no-batching`), each client its own process.\n")
    lines.append("## Throughput (structures/s; median of repeats, min–max in brackets)\n")
    lines.append("With one client nothing can be merged (the server does not wait when every connected client "
                 "already has a request queued), so the 1-client rows differ by noise only.\n")
    lines.append("| model | clients | batching on | batching off | on/off |")
    lines.append("| --- | --- | --- | --- | --- |")
    for name, results in rows:
        for n_clients in (1, 4, 16):
            on, off = results[(n_clients, True)], results[(n_clients, False)]
            lines.append(
                f"| {name} | {n_clients} | {statistics.median(on):.0f} [{min(on):.0f}–{max(on):.0f}] | "
                f"{statistics.median(off):.0f} [{min(off):.0f}–{max(off):.0f}] | "
                f"{statistics.median(on) / statistics.median(off):.2f}× |"
            )
    lines.append("\n## Per-call overhead for 9 atoms (one client, unix socket)\n")
    lines.append("Wall-clock overhead = median over repeats of (round trip − in-process call). CPU overhead = "
                 "(client + server process CPU time per call) − (in-process CPU time per call): the work the "
                 "socket path adds, less sensitive to other jobs on the machine than wall time.\n")
    lines.append("| model | in-process ms/call | via server ms/call | wall overhead µs (median [min–max]) "
                 "| CPU overhead µs (median [min–max]) |")
    lines.append("| --- | --- | --- | --- | --- |")
    for name, ov in over_rows:
        lines.append(f"| {name} | {ov['in_process_ms']:.2f} | {ov['remote_ms']:.2f} | "
                     f"{ov['overhead_us']:.0f} [{ov['overhead_min_us']:.0f}–{ov['overhead_max_us']:.0f}] | "
                     f"{ov['cpu_overhead_us']:.0f} [{ov['cpu_overhead_min_us']:.0f}–{ov['cpu_overhead_max_us']:.0f}] |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
