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
(ours, SchNetPack, ours, ...) over ``--repeats`` rounds and the table shows the
median ms/step over all timed chunks of all rounds, with min-max. Our worker also
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
# (warm-up steps, timed chunks, steps per chunk)
PLAN = {"ethanol": (10, 4, 25), "water192": (2, 3, 2), "water1536": (1, 2, 1)}


def load_system(name: str):
    from ase.io import read

    if name == "ethanol":
        return read(DATA / "ethanol_gfn2xtb_500K.extxyz", index=0)
    water = read(DATA / "water16_pbc_gfn1xtb_300K.extxyz", index=0)
    return water.repeat((2, 2, 1) if name == "water192" else (4, 4, 2))


# ---------------------------------------------------------------------------- shared
def time_steps(sim, warm: int, chunks: int, per: int) -> tuple[float, list[float]]:
    """Run ``warm`` steps (seconds taken, compilation included), then ``chunks`` timed
    chunks of ``per`` steps; returns (warm-up s, ms per step of each chunk). Any simulator
    with ``simulate(n)`` (ours or SchNetPack's)."""
    t0 = time.perf_counter()
    sim.simulate(warm)
    warm_s = time.perf_counter() - t0
    step_ms = []
    for _ in range(chunks):
        t = time.perf_counter()
        sim.simulate(per)
        step_ms.append((time.perf_counter() - t) / per * 1e3)
    return warm_s, step_ms


def worker_env(impl: str, tune_peer: bool = False) -> dict[str, str] | None:
    """Environment of a worker process: ours gets the allocator tunable the commands set for
    themselves (spkserve.allocator); the peer runs as installed unless ``tune_peer``."""
    from spkserve.allocator import tuned_environment

    return tuned_environment() if impl.startswith("ours") or tune_peer else None


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


def ours_worker(system_name: str, kind: str, dynamics: str, skin: float, compiled: bool = False) -> dict:
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
    sim = Simulator(system, VelocityVerlet(TIME_STEP_FS), calc, hooks=hooks, seed=0)
    warm_s, step_ms = time_steps(sim, *PLAN[system_name])
    _, chunks, per = PLAN[system_name]
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


def spk_worker(system_name: str, kind: str, dynamics: str, skin: float) -> dict:
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
    sim = md.Simulator(system, md.integrators.VelocityVerlet(TIME_STEP_FS), calc, simulator_hooks=hooks, progress=False)
    sim = sim.to(torch.float32)
    _, step_ms = time_steps(sim, *PLAN[system_name])
    return {"step_ms": step_ms, "n_atoms": len(atoms)}


WORKERS = {
    "ours": ours_worker,
    "ours-compiled": lambda *a: ours_worker(*a, compiled=True),
    "schnetpack": spk_worker,
}


def run_case(impl: str, system: str, kind: str, dynamics: str, skin: float, threads: int, tune_peer: bool) -> dict:
    """One case in a fresh process. Ours gets the allocator tunable that the ``spkmd``
    command sets for itself (spkserve.allocator); SchNetPack runs as installed unless
    ``tune_peer``."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", impl, system, kind, dynamics, "--skin", str(skin), "--threads", str(threads)],
        capture_output=True, text=True, env=worker_env(impl, tune_peer),
    )
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {system} {kind} {dynamics} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def fmt(values: list[float]) -> str:
    return f"{statistics.median(values):.2f} ({min(values):.2f}-{max(values):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ethanol and 192 atoms only")
    ap.add_argument("--repeats", type=int, default=2, help="rounds of (ours, SchNetPack) per case")
    ap.add_argument("--skin", type=float, default=2.0, help="our neighbor-list skin in Å")
    ap.add_argument("--threads", type=int, default=2, help="torch threads per process")
    ap.add_argument("--systems", nargs="*", default=None, help="ethanol water192 water1536")
    ap.add_argument("--models", nargs="*", default=["schnet", "painn"])
    ap.add_argument("--modes", choices=("eager", "compiled", "both"), default="both", help="spkmd modes to run")
    ap.add_argument("--tune-peer", action="store_true", help="give SchNetPack the same allocator tunable")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "md.md"))
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "SYSTEM", "MODEL", "DYNAMICS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        impl, system, kind, dynamics = args.worker
        res = WORKERS[impl](system, kind, dynamics, args.skin)
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
                        res[impl].append(run_case(impl, system, kind, dynamics, args.skin, args.threads, args.tune_peer))
                        loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
                s = res["schnetpack"]
                s_step = [x for r in s for x in r["step_ms"]]
                for impl in ours_impls:
                    o = res[impl]
                    o_step = [x for r in o for x in r["step_ms"]]
                    bare = [x for r in o for x in r["bare_ms"]]
                    prov = [x for r in o for x in r["provider_ms"]]
                    row = {
                        "system": f"{system} ({o[0]['n_atoms']} atoms, {o[0]['pairs']} pairs)", "model": kind,
                        "dyn": dynamics, "mode": "compiled" if impl.endswith("compiled") else "eager",
                        "ours": fmt(o_step), "spk": fmt(s_step),
                        "speedup": f"{statistics.median(s_step) / statistics.median(o_step):.2f}x",
                        "bare": fmt(bare), "provider": fmt(prov),
                        "overhead": f"{(statistics.median(o_step) / statistics.median(bare) - 1) * 100:+.0f}%",
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
        + (" --tune-peer" if args.tune_peer else "")
    )
    lines = [
        "# MD step: spkmd vs schnetpack.md 2.2.0",
        "",
        f"Command: `{cmd}`  ",
        f"torch {torch.__version__}, schnetpack {schnetpack.__version__}, float32, {args.threads} threads, time step {TIME_STEP_FS} fs, "
        f"{platform.machine()}; 1-min load average during the run: {min(loads):.1f}-{max(loads):.1f} (2 cores, shared).  ",
        "ms per MD step: median over timed chunks of all rounds (min-max). `mode`: spkmd eager (default) or with "
        "`calculator.compile=true` (torch.compile of the functional energy+forces graph). `bare model`: the model's "
        "energy+forces call in that mode on a batch with precomputed pairs; `provider`: ModelRunner.compute_tensors "
        "(skin list + model + conversions); `MD overhead`: our step over the bare model. Peak RSS of a fresh process "
        "per case (ours / SchNetPack, and the ratio). `warm-up s`: our first steps including compilation. "
        "Our workers run with the allocator tunable the `spkmd` command sets (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`); "
        + ("SchNetPack gets it too (`--tune-peer`). " if args.tune_peer else "SchNetPack runs as installed. ")
        + "`NL builds`: our neighbor-list builds / calls in the first round.",
        "",
        "| system | model | dynamics | mode | spkmd ms/step | SchNetPack ms/step | speed-up | bare model ms | provider ms "
        "| MD overhead | peak RSS MB | RSS ratio | warm-up s | NL builds |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['system']} | {r['model']} | {r['dyn']} | {r['mode']} | {r['ours']} | {r['spk']} | {r['speedup']} | "
        f"{r['bare']} | {r['provider']} | {r['overhead']} | {r['rss']} | {r['rss_ratio']} | {r['warm']} | {r['nl']} |"
        for r in rows
    ]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
