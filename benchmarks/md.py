"""MD benchmark: spkmd against schnetpack.md 2.2.0, side by side in one run.

Randomly initialised SchNet (128 features, 6 interactions, 20 Gaussians, cosine
cutoff 5 Å) and PaiNN (128 features, 3 interactions, 20 Gaussians) - ours from
``spkserve.nn`` written as a bundle, SchNetPack's own built with the same sizes and
saved with ``torch.save`` as SchNetPack's calculator expects - float32, 2 threads,
time step 0.5 fs, NVE and Langevin (300 K, 100 fs). Neighbor lists: ours vesin with
a skin of ``--skin`` Å (default 2), SchNetPack MatScipy with a 2 Å shell
(``NeighborListMD``). Systems: ethanol (9 atoms) and the 16-water periodic xTB box
replicated to 192 and 1536 atoms.

Every (implementation, system, model, dynamics) case runs in a fresh subprocess
(peak RSS = ``ru_maxrss`` of that process); implementations alternate
(ours, SchNetPack, ours, ...) over ``--repeats`` (>= 3) rounds. Both simulators are timed
the same way: an end-of-step hook stamps the clock inside ONE long ``simulate(n)`` call that
lasts at least ``--min-seconds`` (SchNetPack's ``simulate`` makes an extra force call at its
start; it falls before the first stamp). The table shows the median ms/step over all timed
steps of all rounds, with the range of the per-round medians. The allocator tunable our
commands set for themselves is given to both codes by default (``--allocator both``). Our worker also
times the bare model call (energy + forces on a batch with precomputed pairs) and
the provider call (``ModelRunner.compute_tensors``: skin list + model), so the
overhead of the MD step over the model is visible.

Run in the benchmark venv (SchNetPack installed, our package editable):

    /work/bench-venv/bin/python benchmarks/md.py            # ethanol, 192 and 1536 atoms
    /work/bench-venv/bin/python benchmarks/md.py --quick    # ethanol and 192 atoms
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

DATA = Path("/work/shared/data/xtb")
CUTOFF = 5.0
TIME_STEP_FS = 0.5
# (warm-up steps, minimum timed steps): every case also runs for at least --min-seconds
PLAN = {"ethanol": (20, 200), "water192": (3, 20), "water1536": (2, 6)}
MAX_TIMED_STEPS = 5000


def load_system(name: str):
    from ase.io import read

    if name == "ethanol":
        return read(DATA / "ethanol_gfn2xtb_500K.extxyz", index=0)
    water = read(DATA / "water16_pbc_gfn1xtb_300K.extxyz", index=0)
    return water.repeat((2, 2, 1) if name == "water192" else (4, 4, 2))


# ---------------------------------------------------------------------------- shared
def step_timer(impl: str):
    """A hook that stamps the wall clock at the end of every step, for our simulator or
    SchNetPack's (``impl`` "ours..." or "schnetpack"); the stamps are in ``hook.stamps``."""
    if impl == "schnetpack":
        from schnetpack.md.simulation_hooks import SimulationHook as Base
    else:
        from spkmd.hooks.base import Hook as Base

    class StepTimer(Base):
        def __init__(self):
            super().__init__()
            self.stamps: list[float] = []

        def on_step_finalize(self, simulator) -> None:
            self.stamps.append(time.perf_counter())

    return StepTimer()


def _intervals_ms(stamps: list[float]) -> list[float]:
    return [(b - a) * 1e3 for a, b in zip(stamps, stamps[1:])]


def time_steps(sim, timer, warm: int, min_steps: int, min_seconds: float) -> tuple[float, list[float]]:
    """Per-step timing inside one long run, the same for ours and SchNetPack's simulator.

    ``warm`` steps first (seconds taken, compilation included); then ONE ``simulate(n)`` call
    with n >= ``min_steps`` chosen so the run lasts about ``min_seconds``. The step times are
    the intervals between consecutive end-of-step stamps of ``timer`` (see :func:`step_timer`),
    so the force call SchNetPack's ``simulate`` makes at its start (and our first-step set-up)
    falls before the first stamp and is never counted. Returns (warm-up s, ms of each step).
    """
    t0 = time.perf_counter()
    sim.simulate(warm)
    warm_s = time.perf_counter() - t0
    recent = _intervals_ms(timer.stamps[-max(2, warm // 2):])
    estimate_ms = statistics.median(recent) if recent else warm_s * 1e3 / max(warm, 1)
    n = min(MAX_TIMED_STEPS, max(min_steps, int(min_seconds * 1e3 / max(estimate_ms, 1e-3)))) + 1
    timer.stamps.clear()
    sim.simulate(n)
    return warm_s, _intervals_ms(timer.stamps)


ALLOCATOR = ("both", "neither", "ours-only")


def worker_env(impl: str, allocator: str = "both") -> dict[str, str] | None:
    """Environment of a worker process. ``allocator``: "both" (default, fair: ours gets the
    allocator tunable its commands set for themselves, spkserve.allocator, and SchNetPack the
    same), "neither" (both as installed, the tunable removed) or "ours-only" (what our command
    does by itself, with the peer as installed: not a fair comparison, a separate row)."""
    import os

    from spkserve.allocator import tuned_environment

    if allocator == "both" or (allocator == "ours-only" and impl.startswith("ours")):
        return tuned_environment()
    env = dict(os.environ)
    env.pop("GLIBC_TUNABLES", None)
    env["SPK_MALLOC_TUNING"] = "0"
    return env


# ---------------------------------------------------------------------------- ours
def ours_bundle(kind: str, directory: Path) -> Path:
    from spkserve.bundle import default_outputs, write_bundle
    from spkserve.nn.models import painn_energy_model, schnet_energy_model

    torch.manual_seed(0)
    if kind == "schnet":
        m = schnet_energy_model(cutoff=CUTOFF, n_atom_basis=128, n_interactions=6, n_rbf=20)
    else:
        m = painn_energy_model(cutoff=CUTOFF, n_atom_basis=128, n_interactions=3, n_rbf=20)
    path = directory / f"{kind}.bundle"
    meta = {
        "species": [1, 6, 7, 8], "cutoff": CUTOFF, "units": {"length": "Angstrom", "energy": "eV"},
        "outputs": default_outputs("eV", "Angstrom", stress=False),
        "provenance": {"description": f"random {kind} for benchmarks/md.py"},
    }
    return write_bundle(path, m.float(), meta)


def ours_worker(system_name: str, kind: str, dynamics: str, skin: float, min_seconds: float,
                compiled: bool = False) -> dict:
    from spkserve import keys, units
    from spkserve.batch import Structure, collate
    from spkserve.neighbors import add_neighbor_pairs
    from spkmd.calculators import BundleCalculator
    from spkmd.initializers import MaxwellBoltzmann
    from spkmd.integrators import VelocityVerlet
    from spkmd.simulator import Simulator
    from spkmd.system import System
    from spkmd.thermostats import Langevin

    atoms = load_system(system_name)
    with tempfile.TemporaryDirectory() as d:
        path = ours_bundle(kind, Path(d))
        calc = BundleCalculator(path, dtype="float32", skin_angstrom=skin, stress=False, compile=compiled)
    system = System.from_atoms(atoms, dtype=torch.float32)
    MaxwellBoltzmann(300.0)(system, torch.Generator().manual_seed(0))
    hooks = [Langevin(300.0, 100.0)] if dynamics == "langevin" else []
    timer = step_timer("ours")
    sim = Simulator(system, VelocityVerlet(TIME_STEP_FS), calc, hooks=[*hooks, timer], seed=0)
    warm_s, step_ms = time_steps(sim, timer, *PLAN[system_name], min_seconds)
    chunks, per = 3, max(1, min(len(step_ms) // 3, 50))
    # bare model call: precomputed exact-cutoff pairs, energy + forces
    runner = calc.provider
    if compiled:
        from spkserve.runtime import SMALL_PAIRS

        def model(b, props):
            if b[keys.idx_i].shape[0] >= SMALL_PAIRS:  # the runner's rule: large batches run eagerly
                return runner.model(b, props)
            with torch.no_grad():
                return runner.compiled_model()(b, props)
    else:
        model = runner.model
    batch = add_neighbor_pairs(collate([Structure.from_atoms(atoms)], dtype=torch.float32), CUTOFF)
    model(batch, (keys.energy, keys.forces))
    if compiled:
        assert runner.compile, "compilation failed; see the warning"
    bare_ms, provider_ms = [], []
    for _ in range(chunks):
        t = time.perf_counter()
        for _ in range(per):
            out = model(batch, (keys.energy, keys.forces))
            out[keys.forces].sum().item()
        bare_ms.append((time.perf_counter() - t) / per * 1e3)
        numbers = system.atomic_numbers
        to_A = units.factor("Bohr", "Angstrom")
        pos = (system.positions[0] * to_A).contiguous()
        cells = system.cells[0] * to_A
        t = time.perf_counter()
        for _ in range(per):
            calc.provider.compute_tensors(numbers, pos, cells, system.pbc, system.n_atoms, (keys.energy, keys.forces))
        provider_ms.append((time.perf_counter() - t) / per * 1e3)
    nl = calc.provider.neighbors
    return {
        "step_ms": step_ms, "bare_ms": bare_ms, "provider_ms": provider_ms,
        "pairs": int(batch[keys.idx_i].numel()), "n_atoms": len(atoms),
        "nl_builds": getattr(nl, "n_builds", None), "nl_calls": getattr(nl, "n_calls", None),
        "T_K": float(system.temperature().mean()), "warmup_s": warm_s,
    }


# ---------------------------------------------------------------------------- SchNetPack
def spk_model_file(kind: str, directory: Path) -> Path:
    import schnetpack as spk

    torch.manual_seed(0)
    rbf = spk.nn.GaussianRBF(n_rbf=20, cutoff=CUTOFF)
    if kind == "schnet":
        rep = spk.representation.SchNet(n_atom_basis=128, n_interactions=6, radial_basis=rbf,
                                        cutoff_fn=spk.nn.CosineCutoff(CUTOFF))
    else:
        rep = spk.representation.PaiNN(n_atom_basis=128, n_interactions=3, radial_basis=rbf,
                                       cutoff_fn=spk.nn.CosineCutoff(CUTOFF))
    model = spk.model.NeuralNetworkPotential(
        representation=rep, input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=128, output_key="energy"), spk.atomistic.Forces()],
    )
    path = directory / f"{kind}.spk.pt"
    torch.save(model, path)
    return path


def spk_worker(system_name: str, kind: str, dynamics: str, skin: float, min_seconds: float) -> dict:
    import schnetpack.transform as trn
    from schnetpack import md
    from schnetpack.md.calculators import SchNetPackCalculator
    from schnetpack.md.neighborlist_md import NeighborListMD
    from schnetpack.md.simulation_hooks import LangevinThermostat

    atoms = load_system(system_name)
    with tempfile.TemporaryDirectory() as d:
        model_file = spk_model_file(kind, Path(d))
        nl = NeighborListMD(cutoff=CUTOFF, cutoff_shell=2.0, base_nbl=trn.MatScipyNeighborList)
        calc = SchNetPackCalculator(str(model_file), "forces", "eV", "Angstrom", nl, energy_key="energy")
    system = md.System()
    system.load_molecules(atoms, n_replicas=1, position_unit_input="Angstrom")
    md.UniformInit(300.0, remove_center_of_mass=True, remove_translation=True, remove_rotation=False).initialize_system(system)
    hooks = [LangevinThermostat(300.0, 100.0)] if dynamics == "langevin" else []
    timer = step_timer("schnetpack")
    sim = md.Simulator(system, md.integrators.VelocityVerlet(TIME_STEP_FS), calc, simulator_hooks=[*hooks, timer],
                       progress=False)
    sim = sim.to(torch.float32)
    _, step_ms = time_steps(sim, timer, *PLAN[system_name], min_seconds)
    return {"step_ms": step_ms, "n_atoms": len(atoms)}


WORKERS = {
    "ours": ours_worker,
    "ours-compiled": lambda *a: ours_worker(*a, compiled=True),
    "schnetpack": spk_worker,
}


def run_case(impl: str, system: str, kind: str, dynamics: str, skin: float, threads: int, allocator: str,
             min_seconds: float) -> dict:
    """One case in a fresh process, with the allocator setting of :func:`worker_env`."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", impl, system, kind, dynamics, "--skin", str(skin), "--threads", str(threads),
         "--min-seconds", str(min_seconds)],
        capture_output=True, text=True, env=worker_env(impl, allocator),
    )
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {system} {kind} {dynamics} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(rounds: list[list[float]], digits: int = 2) -> str:
    """Median over every timed step of every round, with the range of the per-round medians."""
    meds = [statistics.median(r) for r in rounds]
    flat = [x for r in rounds for x in r]
    return f"{statistics.median(flat):.{digits}f} ({min(meds):.{digits}f}-{max(meds):.{digits}f})"


def speedup(peer: list[list[float]], ours: list[list[float]]) -> str:
    """Peer ÷ ours of the all-step medians, with the range over rounds (round k of each side)."""
    flat = lambda rs: statistics.median([x for r in rs for x in r])  # noqa: E731
    per_round = [statistics.median(p) / statistics.median(o) for p, o in zip(peer, ours)]
    return f"{flat(peer) / flat(ours):.2f}x ({min(per_round):.2f}-{max(per_round):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ethanol and 192 atoms only")
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (ours, SchNetPack) per case (>= 3)")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="minimum timed duration of each case's run")
    ap.add_argument("--skin", type=float, default=2.0, help="our neighbor-list skin in Å")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--systems", nargs="*", default=None, help="ethanol water192 water1536")
    ap.add_argument("--models", nargs="*", default=["schnet", "painn"])
    ap.add_argument("--modes", choices=("eager", "compiled", "both"), default="both", help="spkmd modes to run")
    ap.add_argument("--allocator", choices=ALLOCATOR, default="both",
                    help="who gets the glibc allocator tunable: both (fair, default), neither, ours-only (a separate row)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "md.md"))
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "SYSTEM", "MODEL", "DYNAMICS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        impl, system, kind, dynamics = args.worker
        res = WORKERS[impl](system, kind, dynamics, args.skin, args.min_seconds)
        res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    import schnetpack

    systems = args.systems or (["ethanol", "water192"] if args.quick else ["ethanol", "water192", "water1536"])
    ours_impls = {"eager": ["ours"], "compiled": ["ours-compiled"], "both": ["ours", "ours-compiled"]}[args.modes]
    loads = []
    rows = []
    for system in systems:
        for kind in args.models:
            for dynamics in ("nve", "langevin"):
                res = {impl: [] for impl in (*ours_impls, "schnetpack")}
                for _ in range(args.repeats):
                    for impl in res:
                        res[impl].append(run_case(impl, system, kind, dynamics, args.skin, args.threads, args.allocator,
                                                  args.min_seconds))
                        loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
                s = res["schnetpack"]
                s_step = [r["step_ms"] for r in s]
                for impl in ours_impls:
                    o = res[impl]
                    o_step = [r["step_ms"] for r in o]
                    bare = [r["bare_ms"] for r in o]
                    prov = [r["provider_ms"] for r in o]
                    med = lambda rs: statistics.median([x for r in rs for x in r])  # noqa: E731
                    row = {
                        "system": f"{system} ({o[0]['n_atoms']} atoms, {o[0]['pairs']} pairs)", "model": kind,
                        "dyn": dynamics, "mode": "compiled" if impl.endswith("compiled") else "eager",
                        "ours": fmt(o_step), "spk": fmt(s_step),
                        "speedup": speedup(s_step, o_step), "steps": f"{sum(map(len, o_step))} / {sum(map(len, s_step))}",
                        "bare": fmt(bare), "provider": fmt(prov),
                        "overhead": f"{(med(o_step) / med(bare) - 1) * 100:+.0f}%",
                        "rss": f"{max(r['rss_mb'] for r in o):.0f} / {max(r['rss_mb'] for r in s):.0f}",
                        "rss_ratio": f"{max(r['rss_mb'] for r in o) / max(r['rss_mb'] for r in s):.2f}",
                        "warm": f"{statistics.median(r['warmup_s'] for r in o):.1f}",
                        "nl": f"{o[0]['nl_builds']}/{o[0]['nl_calls']}",
                    }
                    rows.append(row)
                    print(row, flush=True)
    cmd = (
        f"{Path(sys.executable)} benchmarks/md.py{' --quick' if args.quick else ''} --repeats {args.repeats} "
        f"--skin {args.skin} --threads {args.threads} --modes {args.modes}"
        + (f" --systems {' '.join(args.systems)}" if args.systems else "")
        + (f" --models {' '.join(args.models)}" if args.models != ["schnet", "painn"] else "")
        + f" --allocator {args.allocator} --min-seconds {args.min_seconds:g}"
    )
    lines = [
        "# MD step: spkmd vs schnetpack.md 2.2.0",
        "",
        f"Command: `{cmd}`  ",
        f"torch {torch.__version__}, schnetpack {schnetpack.__version__}, float32, {args.threads} threads, time step {TIME_STEP_FS} fs, "
        f"{platform.machine()}; 1-min load average during the run: {min(loads):.1f}-{max(loads):.1f} (2 cores, shared).  ",
        "ms per MD step: median over every timed step of all rounds (range of the per-round medians), each step "
        "timed by an end-of-step hook inside one long `simulate(n)` call on both sides (SchNetPack's extra force call "
        "at the start of `simulate` is never counted); `speed-up`: SchNetPack ÷ ours (range over rounds); `timed "
        "steps`: ours / SchNetPack over all rounds. `mode`: spkmd eager (default) or with "
        "`calculator.compile=true` (torch.compile of the functional energy+forces graph). `bare model`: the model's "
        "energy+forces call in that mode on a batch with precomputed pairs; `provider`: ModelRunner.compute_tensors "
        "(skin list + model + conversions); `MD overhead`: our step over the bare model. Peak RSS of a fresh process "
        "per case (ours / SchNetPack, and the ratio). `warm-up s`: our first steps including compilation. "
        + {"both": "Both codes run with the allocator tunable the `spkmd` command sets for itself "
           "(`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`): the fair headline. ",
           "neither": "Neither code gets the allocator tunable (both as installed). ",
           "ours-only": "Only ours gets the allocator tunable `spkmd` sets for itself, SchNetPack runs as installed: "
           "NOT a like-for-like comparison. "}[args.allocator]
        + "`NL builds`: our neighbor-list builds / calls in the first round.",
        "",
        "| system | model | dynamics | mode | spkmd ms/step | SchNetPack ms/step | speed-up | timed steps | bare model ms "
        "| provider ms | MD overhead | peak RSS MB | RSS ratio | warm-up s | NL builds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['system']} | {r['model']} | {r['dyn']} | {r['mode']} | {r['ours']} | {r['spk']} | {r['speedup']} | "
        f"{r['steps']} | {r['bare']} | {r['provider']} | {r['overhead']} | {r['rss']} | {r['rss_ratio']} | {r['warm']} | {r['nl']} |"
        for r in rows
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
