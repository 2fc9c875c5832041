"""i-PI benchmarks: `spkserve ipi` against ASE's SocketClient, socket overhead, batched beads.

(1) i-PI-driven NVE of ethanol (9 atoms, 0.5 fs), randomly initialised SchNet
    (128 features, 6 interactions, 20 Gaussians, cosine cutoff 5 Å), float32:
    `spkserve ipi BUNDLE` against ASE's `SocketClient` wrapping SchNetPack 2.2's
    `SpkCalculator` (same architecture and sizes, skin neighbor list with a 2 Å
    shell, run in /work/bench-venv), and against ASE's SocketClient wrapping our
    own `BundleCalculator`. Steps/s between step 30 and the last step, read
    off i-PI's flushed properties file. Runs interleaved A B C A B C ...
(2) Socket overhead per call for 9 atoms: a minimal i-PI server loop in this
    process (POSDATA+GETFORCE -> FORCEREADY over a unix socket) with
    `spkserve ipi` in a subprocess, against the same evaluation in-process;
    for the SchNet bundle and for a Lennard-Jones bundle (cheap model).
(3) i-PI PIMD, 16 beads, same SchNet: ffsocket batch_size=16 with one client,
    one client with --workers 16, 16 separate client processes, and one
    client answering the beads one by one.

Run:  .venv/bin/python benchmarks/ipi.py            (writes benchmarks/results/ipi.md)
      .venv/bin/python benchmarks/ipi.py --quick    (fewer steps and repeats)
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = Path(sys.executable).parent
BENCH_PY = Path("/work/bench-venv/bin/python")
ETHANOL = REPO.parent / "shared" / "data" / "scripts" / "start_ethanol.xyz"
RESULTS = Path(__file__).parent / "results" / "ipi.md"
CUTOFF = 5.0

_SPK_MODEL = textwrap.dedent(
    """
    import sys, torch, schnetpack as spk, schnetpack.transform as trn
    torch.manual_seed(0)
    cutoff = float(sys.argv[2])
    rep = spk.representation.SchNet(
        n_atom_basis=128, n_interactions=6, radial_basis=spk.nn.GaussianRBF(n_rbf=20, cutoff=cutoff),
        cutoff_fn=spk.nn.CosineCutoff(cutoff))
    model = spk.model.NeuralNetworkPotential(
        representation=rep, input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=128, output_key="energy"),
                        spk.atomistic.Forces(energy_key="energy", force_key="forces")],
        postprocessors=[trn.CastTo64()])
    torch.save(model, sys.argv[1])
    """
)

_SPK_CLIENT = textwrap.dedent(
    """
    import sys, torch, schnetpack.transform as trn
    from ase.io import read
    from ase.calculators.socketio import SocketClient
    from schnetpack.interfaces.ase_interface import SpkCalculator
    atoms = read(sys.argv[2]); atoms.pbc = False
    nl = trn.SkinNeighborList(trn.MatScipyNeighborList(cutoff=float(sys.argv[4])), cutoff_skin=2.0)
    atoms.calc = SpkCalculator(model=sys.argv[1], neighbor_list=nl, energy_unit="eV", position_unit="Ang",
                               dtype=torch.float32)
    SocketClient(unixsocket=sys.argv[3]).run(atoms)
    """
)

_OUR_ASE_CLIENT = textwrap.dedent(
    """
    import sys
    from ase.io import read
    from ase.calculators.socketio import SocketClient
    from spkserve.ase import BundleCalculator
    atoms = read(sys.argv[2]); atoms.pbc = False
    atoms.calc = BundleCalculator(sys.argv[1])
    SocketClient(unixsocket=sys.argv[3]).run(atoms)
    """
)


def client_env(threads: int) -> dict:
    """Environment giving every client process the same torch/OpenMP thread count."""
    return dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))


def _ipi_xml(prefix: str, address: str, steps: int, nbeads: int, batch_size: int, stride: int) -> str:
    return f"""<simulation verbosity="quiet" safe_stride="1000000" sockets_prefix="{prefix}">
  <output prefix="sim">
    <properties stride="{stride}" filename="out" flush="1">[step, conserved, potential]</properties>
  </output>
  <total_steps>{steps}</total_steps>
  <prng><seed>4242</seed></prng>
  <ffsocket name="spk" mode="unix" pbc="false">
    <address>{address}</address>
    <latency>1e-4</latency>
    <batch_size>{batch_size}</batch_size>
  </ffsocket>
  <system>
    <initialize nbeads="{nbeads}">
      <file mode="xyz" units="angstrom">init.xyz</file>
      <velocities mode="thermal" units="kelvin">300</velocities>
    </initialize>
    <forces><force forcefield="spk"/></forces>
    <ensemble><temperature units="kelvin">300</temperature></ensemble>
    <motion mode="dynamics">
      <dynamics mode="nve"><timestep units="femtosecond">0.5</timestep></dynamics>
    </motion>
  </system>
</simulation>
"""


def _write_init(work: Path) -> list[str]:
    from ase.io import read

    atoms = read(ETHANOL)
    atoms.positions += 10.0 - atoms.get_center_of_mass()
    lines = [str(len(atoms)), "# CELL(abcABC): 20.0 20.0 20.0 90.0 90.0 90.0 cell{angstrom} positions{angstrom}"]
    lines += [f"{s} {x:.8f} {y:.8f} {z:.8f}" for s, (x, y, z) in zip(atoms.get_chemical_symbols(), atoms.positions)]
    (work / "init.xyz").write_text("\n".join(lines) + "\n")
    return atoms.get_chemical_symbols()


def _cpu_s(pids: list[int]) -> float:
    """User + system CPU seconds used so far by these processes (from /proc)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except FileNotFoundError:
            continue
        total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / tick


def _last_step(path: Path) -> int:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 400))
            lines = [ln for ln in fh.read().decode().splitlines() if ln.strip() and not ln.startswith("#")]
    except FileNotFoundError:
        return -1
    if len(lines) < 1:
        return -1
    try:
        return int(float(lines[-1].split()[0]))
    except (ValueError, IndexError):
        return -1


def run_ipi(
    clients: list[list[str]], steps: int, env: dict, nbeads: int = 1, batch_size: int = 1, warm: int = 50,
    stride: int = 10, prestart_s: float = 0.0,
) -> tuple[float, float]:
    """Run i-PI with the given client commands ({addr} is replaced).

    Returns steps/s (wall clock) and client CPU ms per step (all client
    processes together), measured from step ``warm`` to 5 steps before the end.

    With ``prestart_s`` > 0 the clients start first (they retry connecting) and i-PI
    only after that many seconds, so that all of them are connected from the first step.
    """
    work = Path(tempfile.mkdtemp(prefix="spkbench", dir="/tmp"))
    procs: list[subprocess.Popen] = []
    try:
        symbols = _write_init(work)
        # ASE's SocketClient connects to /tmp/ipi_NAME only: use i-PI's default prefix and a unique name
        addr = f"spkbench_{os.getpid()}_{work.name}"
        (work / "input.xml").write_text(_ipi_xml("/tmp/ipi_", addr, steps, nbeads, batch_size, stride))
        log = open(work / "ipi.log", "w")

        def start_ipi() -> subprocess.Popen:
            proc = subprocess.Popen([str(VENV_BIN / "i-pi"), "input.xml"], cwd=work, stdout=log, stderr=subprocess.STDOUT)
            procs.insert(0, proc)
            return proc

        if not prestart_s:
            ipi = start_ipi()
            while not os.path.exists(f"/tmp/ipi_{addr}"):  # ASE's SocketClient does not retry connecting
                if ipi.poll() is not None:
                    raise RuntimeError(f"i-PI failed: {(work / 'ipi.log').read_text()[-2000:]}")
                time.sleep(0.05)
        for cmd in clients:
            cmd = [c.replace("{addr}", addr).replace("{species}", ",".join(symbols)) for c in cmd]
            procs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=work, env=env))
        if prestart_s:
            time.sleep(prestart_s)
            ipi = start_ipi()
        out = work / "sim.out"
        clients_pids = [p.pid for p in procs if p is not ipi]
        end_at = steps - 5  # stop the clock before i-PI sends EXIT, while the clients still run
        t_warm = None
        deadline = time.monotonic() + 1200
        while ipi.poll() is None:
            step = _last_step(out)
            if t_warm is None and step >= warm:
                t_warm, s_warm, cpu_warm = time.perf_counter(), step, _cpu_s(clients_pids)
            if t_warm is not None and step >= end_at:
                t_end, s_end, cpu_end = time.perf_counter(), step, _cpu_s(clients_pids)
                break
            if time.monotonic() > deadline:
                raise TimeoutError("i-PI run took too long")
            time.sleep(0.003)
        else:
            raise RuntimeError(f"i-PI stopped early: {(work / 'ipi.log').read_text()[-2000:]}")
        ipi.wait(120)
        n = s_end - s_warm
        return n / (t_end - t_warm), (cpu_end - cpu_warm) / n * 1e3
    finally:
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        shutil.rmtree(work, ignore_errors=True)


def make_models(work: Path) -> dict[str, Path]:
    import torch

    from spkserve.bundle import default_outputs, write_bundle
    from spkserve.nn.models import schnet_energy_model
    from spkserve.potentials import reference_bundle

    torch.manual_seed(0)
    model = schnet_energy_model(cutoff=CUTOFF, n_atom_basis=128, n_interactions=6, n_rbf=20).to(torch.float32)
    meta = {
        "species": [1, 6, 8],
        "cutoff": CUTOFF,
        "units": {"length": "Angstrom", "energy": "eV"},
        "outputs": default_outputs("eV", "Angstrom", stress=False),
        "provenance": {"description": "random SchNet for benchmarks"},
    }
    paths = {"lj": reference_bundle("lj", work / "lj.bundle", sigma=3.0, epsilon=0.01, cutoff=5.0)}
    try:
        paths["schnet"] = write_bundle(work / "schnet.bundle", model, meta)
    except Exception as err:  # noqa: BLE001  (reported, the LJ parts still run)
        print(f"cannot write the SchNet bundle: {err}")
    if BENCH_PY.exists():
        (work / "spk_model.py").write_text(_SPK_MODEL)
        r = subprocess.run([str(BENCH_PY), str(work / "spk_model.py"), str(work / "spk_schnet.pt"), str(CUTOFF)],
                           capture_output=True, text=True)
        if r.returncode == 0:
            paths["spk"] = work / "spk_schnet.pt"
            (work / "spk_client.py").write_text(_SPK_CLIENT)
        else:
            print("SchNetPack model could not be built:", r.stderr[-1000:])
    (work / "our_ase_client.py").write_text(_OUR_ASE_CLIENT)
    return paths


def socket_overhead(bundle: Path, symbols: list[str], positions_A: np.ndarray, calls: int, blocks: int, env: dict) -> dict:
    """Round trip through `spkserve ipi` vs in-process evaluation, interleaved in blocks."""
    from spkserve import units
    from spkserve.ipi import protocol as P
    from spkserve.ipi.evaluate import BundleEvaluator
    from spkserve.runtime import ModelRunner

    from ase.data import atomic_numbers

    numbers = [atomic_numbers[s] for s in symbols]
    a2b = units.factor("Angstrom", "Bohr")
    cell = np.eye(3)[None] * 20.0 * a2b
    pos = positions_A[None] * a2b
    work = Path(tempfile.mkdtemp(prefix="spkovh", dir="/tmp"))
    path = str(work / "s")
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)
    client = subprocess.Popen(
        [str(VENV_BIN / "spkserve"), "ipi", str(bundle), "--unix", path, "--species", ",".join(symbols), "--pbc", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
    )
    conn, _ = srv.accept()
    conn.sendall(P.STATUS)
    P.read_header(conn)
    conn.sendall(P.pack_init(0, "") + P.STATUS)
    P.read_header(conn)
    evaluator = BundleEvaluator(ModelRunner(bundle), numbers, pbc=False)
    rng = np.random.default_rng(0)
    t_sock, t_local = [], []

    def one_socket(p):
        t0 = time.perf_counter()
        conn.sendall(P.pack_posdata(cell, p) + P.GETFORCE)
        P.read_header(conn)
        P.read_forceready(conn, 1, expect_atoms=len(numbers))
        return time.perf_counter() - t0

    def one_local(p):
        t0 = time.perf_counter()
        evaluator(cell, p)
        return time.perf_counter() - t0

    try:
        for _ in range(20):  # warm-up both
            p = pos + rng.normal(0, 0.01, pos.shape)
            one_socket(p)
            one_local(p)
        cpu_client0 = _cpu_s([client.pid])
        cpu_sock = cpu_local = 0.0
        for _ in range(blocks):
            c0 = time.process_time()
            for _ in range(calls):
                t_sock.append(one_socket(pos + rng.normal(0, 0.01, pos.shape)))
            c1 = time.process_time()
            for _ in range(calls):
                t_local.append(one_local(pos + rng.normal(0, 0.01, pos.shape)))
            cpu_sock += c1 - c0
            cpu_local += time.process_time() - c1
        cpu_client = _cpu_s([client.pid]) - cpu_client0
        conn.sendall(P.EXIT)
        _, err = client.communicate(timeout=30)
    finally:
        conn.close()
        srv.close()
        if client.poll() is None:
            client.kill()
        shutil.rmtree(work, ignore_errors=True)
    import re

    m = re.search(r"(\d+) model calls.*model time ([\d.]+) s", err)
    client_model_us = float(m.group(2)) / int(m.group(1)) * 1e6 if m else float("nan")
    s, l = np.array(t_sock) * 1e6, np.array(t_local) * 1e6
    return {
        "socket_us": np.median(s), "socket_range": (np.percentile(s, 10), np.percentile(s, 90)),
        "local_us": np.median(l), "local_range": (np.percentile(l, 10), np.percentile(l, 90)),
        "client_model_us": client_model_us,
        # CPU per call: client process + this process's send/receive, against the in-process evaluation
        "cpu_socket_us": (cpu_client + cpu_sock) / len(t_sock) * 1e6,
        "cpu_local_us": cpu_local / len(t_local) * 1e6,
    }


def _fmt(values: list[float]) -> str:
    v = np.array(values)
    return f"{np.median(v):.1f} ({v.min():.1f}–{v.max():.1f})"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=["nve", "overhead", "pimd"], default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads of every client (and of in-process runs)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    env = client_env(args.threads)
    steps_nve, repeats, steps_pimd = (120, 1, 30) if args.quick else (250, 3, 40)  # >= 3 repeats for results
    work = Path(tempfile.mkdtemp(prefix="spkbenchmodels", dir="/tmp"))
    lines = []
    load_before = open("/proc/loadavg").read().split()[:3]
    try:
        paths = make_models(work)
        model_path = paths.get("schnet", paths["lj"])
        ours = [str(VENV_BIN / "spkserve"), "ipi", str(model_path), "--unix", "{addr}", "--species", "{species}",
                "--pbc", "no", "--connect-timeout", "600"]
        ase_ours = [sys.executable, str(work / "our_ase_client.py"), str(model_path), str(ETHANOL), "{addr}"]
        if args.only in (None, "nve"):
            results: dict[str, list[float]] = {"spkserve ipi": [], "ASE SocketClient + BundleCalculator": []}
            if "spk" in paths:
                results["ASE SocketClient + SchNetPack SpkCalculator"] = []
            cpu: dict[str, list[float]] = {k: [] for k in results}
            for r in range(repeats):
                for name in results:
                    if name == "spkserve ipi":
                        cmd = ours
                    elif name.startswith("ASE SocketClient + Bundle"):
                        cmd = ase_ours
                    else:
                        cmd = [str(BENCH_PY), str(work / "spk_client.py"), str(paths["spk"]), str(ETHANOL), "{addr}", str(CUTOFF)]
                    sps, cms = run_ipi([cmd], steps_nve, env, warm=30)
                    results[name].append(sps)
                    cpu[name].append(cms)
                    print(f"NVE {name}: {sps:.1f} steps/s, client CPU {cms:.2f} ms/step", flush=True)
            base = np.median(results["spkserve ipi"])
            base_cpu = np.median(cpu["spkserve ipi"])
            lines += ["## (1) i-PI NVE, ethanol (9 atoms), SchNet float32", "",
                      "| client | steps/s median (min–max) | speed-up of spkserve ipi (wall) "
                      "| client CPU ms/step | speed-up of spkserve ipi (CPU) |",
                      "| --- | --- | --- | --- | --- |"]
            for name, v in results.items():
                lines.append(f"| {name} | {_fmt(v)} | {base / np.median(v):.2f}× | {_fmt(cpu[name])} "
                             f"| {np.median(cpu[name]) / base_cpu:.2f}× |")
            lines.append("")
        if args.only in (None, "overhead"):
            from ase.io import read

            atoms = read(ETHANOL)
            atoms.positions += 10.0 - atoms.get_center_of_mass()
            lines += ["## (2) Socket overhead per call, 9 atoms (µs, median; 10–90th percentile)", "",
                      "| model | via `spkserve ipi` socket | in-process | overhead (wall) | model time inside the client "
                      "| CPU per call via socket (both processes) | CPU in-process | overhead (CPU) |",
                      "| --- | --- | --- | --- | --- | --- | --- | --- |"]
            for key, label in (("lj", "Lennard-Jones (float64)"), ("schnet", "SchNet (float32)")):
                if key not in paths:
                    continue
                o = socket_overhead(paths[key], atoms.get_chemical_symbols(), atoms.positions, 200 if not args.quick else 50, 5 if not args.quick else 2, env)
                lines.append(
                    f"| {label} | {o['socket_us']:.0f} ({o['socket_range'][0]:.0f}–{o['socket_range'][1]:.0f}) "
                    f"| {o['local_us']:.0f} ({o['local_range'][0]:.0f}–{o['local_range'][1]:.0f}) "
                    f"| {o['socket_us'] - o['local_us']:.0f} | {o['client_model_us']:.0f} "
                    f"| {o['cpu_socket_us']:.0f} | {o['cpu_local_us']:.0f} | {o['cpu_socket_us'] - o['cpu_local_us']:.0f} |"
                )
                print(lines[-1], flush=True)
            lines.append("")
        if args.only in (None, "pimd"):
            res: dict[str, list[float]] = {}
            res_cpu: dict[str, list[float]] = {}
            cases = {
                "batch_size=16, one client": ([ours], 16),
                "--workers 16, one process": ([ours + ["--workers", "16"]], 1),
                "16 client processes": ([ours] * 16, 1),
                "one client, beads one by one": ([ours], 1),
            }
            for r in range(repeats):
                for name, (clients, bs) in cases.items():
                    sps, cms = run_ipi(clients, steps_pimd, env, nbeads=16, batch_size=bs, warm=10, stride=2, prestart_s=40.0)
                    res.setdefault(name, []).append(sps)
                    res_cpu.setdefault(name, []).append(cms)
                    print(f"PIMD16 {name}: {sps:.2f} steps/s, client CPU {cms:.1f} ms/step", flush=True)
            ref = np.median(res["16 client processes"])
            ref_cpu = np.median(res_cpu["16 client processes"])
            lines += ["## (3) i-PI PIMD, 16 beads, ethanol, SchNet float32", "",
                      "| setup | steps/s median (min–max) | vs 16 processes (wall) | client CPU ms/step | vs 16 processes (CPU) |",
                      "| --- | --- | --- | --- | --- |"]
            for name, v in res.items():
                lines.append(f"| {name} | {_fmt(v)} | {np.median(v) / ref:.2f}× | {_fmt(res_cpu[name])} "
                             f"| {ref_cpu / np.median(res_cpu[name]):.2f}× |")
            lines.append("")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    load_after = open("/proc/loadavg").read().split()[:3]
    header = [
        "# i-PI benchmarks", "",
        f"Command: `.venv/bin/python benchmarks/ipi.py{' --quick' if args.quick else ''}`"
        + (f" `--only {args.only}`" if args.only else ""),
        f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores shared with other jobs; "
        f"load average before {' '.join(load_before)}, after {' '.join(load_after)}. i-PI 3.3.1, unix sockets, "
        f"{args.threads} torch thread(s) per client.",
        "",
    ]
    text = "\n".join(header + lines)
    print(text)
    if not args.quick or args.only is None:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        old = RESULTS.read_text() if RESULTS.exists() and args.only else ""
        RESULTS.write_text(text + ("\n\n" + old if old else "") + "\n")


if __name__ == "__main__":
    main()
