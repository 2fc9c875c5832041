"""Ring-polymer MD benchmark: spkmd.rpmd against schnetpack.md 2.2.0, side by side.

RPMD with 8 and 16 beads, PILE-L thermostat (300 K, τ₀ = 100 fs), time step 0.5 fs, float32,
on ethanol (9 atoms) and the 192-atom water box, with the same randomly initialised SchNet and
PaiNN sizes as ``benchmarks/md.py`` (ours from ``spkserve.nn.models`` as a bundle, SchNetPack's
own saved with ``torch.save``). Ours: all beads in one model call, vesin skin list (2 Å);
SchNetPack: ``RingPolymer`` integrator, ``PILELocalThermostat``, MatScipy ``NeighborListMD``
with a 2 Å shell. Every case runs in a fresh subprocess; implementations alternate
(ours, SchNetPack, ...) over ``--repeats`` (>= 3) rounds. Both sides are timed per step by an
end-of-step hook inside one long ``simulate(n)`` call (``md.time_steps``), so SchNetPack's extra
force call at the start of ``simulate`` is never counted; the allocator tunable goes to both
codes by default. The table gives the median ms per step over all timed steps (range of the
per-round medians) and the steps/s ratio.

    /work/bench-venv/bin/python benchmarks/rpmd.py                 # writes benchmarks/results/rpmd.md
    /work/bench-venv/bin/python benchmarks/rpmd.py --systems ethanol --beads 8
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

sys.path.insert(0, str(Path(__file__).parent))
import md as mdbench  # noqa: E402  (load_system, model builders of the MD benchmark)

TIME_STEP_FS = 0.5
T_K = 300.0
TAU_FS = 100.0
# (warm-up steps, minimum timed steps); every case also runs for at least --min-seconds
PLAN = {"ethanol": (10, 60), "water192": (2, 6)}


def ours_worker(system_name: str, kind: str, n_beads: int, min_seconds: float, compiled: bool = False) -> dict:
    from spkmd.calculators import BundleCalculator
    from spkmd.initializers import MaxwellBoltzmann
    from spkmd.rpmd import PILELocal, RingPolymerIntegrator
    from spkmd.simulator import Simulator
    from spkmd.system import System

    atoms = mdbench.load_system(system_name)
    with tempfile.TemporaryDirectory() as d:
        path = mdbench.ours_bundle(kind, Path(d))
        calc = BundleCalculator(path, dtype="float32", skin_angstrom=2.0, stress=False, compile=compiled)
    system = System.from_atoms(atoms, n_replicas=n_beads, dtype=torch.float32)
    MaxwellBoltzmann(T_K * n_beads)(system, torch.Generator().manual_seed(0))
    timer = mdbench.step_timer("ours")
    sim = Simulator(system, RingPolymerIntegrator(TIME_STEP_FS, T_K), calc, hooks=[PILELocal(T_K, TAU_FS), timer], seed=0)
    warm_s, step_ms = mdbench.time_steps(sim, timer, *PLAN[system_name], min_seconds)
    chunks, per = 3, max(1, min(len(step_ms) // 3, 20))
    # the provider call alone (all beads in one batch: skin list + model)
    from spkserve import keys, units

    R, N = system.n_replicas, system.n_atoms_total
    numbers = system.atomic_numbers.repeat(R)
    pos = (system.positions.reshape(R * N, 3) * units.factor("Bohr", "Angstrom")).contiguous()
    cells = system.cells.reshape(-1, 3, 3) * units.factor("Bohr", "Angstrom")
    prov = []
    for _ in range(chunks):
        t = time.perf_counter()
        for _ in range(per):
            calc.provider.compute_tensors(numbers, pos, cells, system.pbc.repeat(R, 1), system.n_atoms.repeat(R),
                                          (keys.energy, keys.forces))
        prov.append((time.perf_counter() - t) / per * 1e3)
    return {"step_ms": step_ms, "provider_ms": prov, "n_atoms": len(atoms), "warmup_s": warm_s,
            "T_centroid_K": float(system.centroid_temperature().mean())}


def spk_worker(system_name: str, kind: str, n_beads: int, min_seconds: float) -> dict:
    import schnetpack.transform as trn
    from schnetpack import md
    from schnetpack.md.calculators import SchNetPackCalculator
    from schnetpack.md.neighborlist_md import NeighborListMD
    from schnetpack.md.simulation_hooks import PILELocalThermostat

    atoms = mdbench.load_system(system_name)
    with tempfile.TemporaryDirectory() as d:
        model_file = mdbench.spk_model_file(kind, Path(d))
        nl = NeighborListMD(cutoff=mdbench.CUTOFF, cutoff_shell=2.0, base_nbl=trn.MatScipyNeighborList)
        calc = SchNetPackCalculator(str(model_file), "forces", "eV", "Angstrom", nl, energy_key="energy")
    system = md.System()
    system.load_molecules(atoms, n_replicas=n_beads, position_unit_input="Angstrom")
    md.UniformInit(T_K, remove_center_of_mass=True, remove_translation=True, remove_rotation=False).initialize_system(system)
    integ = md.integrators.RingPolymer(TIME_STEP_FS, n_beads, T_K)
    timer = mdbench.step_timer("schnetpack")
    sim = md.Simulator(system, integ, calc, simulator_hooks=[PILELocalThermostat(T_K, TAU_FS), timer], progress=False)
    sim = sim.to(torch.float32)
    _, step_ms = mdbench.time_steps(sim, timer, *PLAN[system_name], min_seconds)
    return {"step_ms": step_ms, "n_atoms": len(atoms)}


WORKERS = {
    "ours": ours_worker,
    "ours-compiled": lambda *a: ours_worker(*a, compiled=True),
    "schnetpack": spk_worker,
}


def run_case(impl: str, system: str, kind: str, n_beads: int, threads: int, allocator: str,
             min_seconds: float) -> dict:
    """One case in a fresh process, with the allocator setting of ``md.worker_env``."""
    out = subprocess.run(
        [sys.executable, __file__, "--worker", impl, system, kind, str(n_beads), "--threads", str(threads),
         "--min-seconds", str(min_seconds)],
        capture_output=True, text=True, env=mdbench.worker_env(impl, allocator),
    )
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {system} {kind} {n_beads} beads failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


fmt = mdbench.fmt
speedup = mdbench.speedup


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (ours, SchNetPack) per case (>= 3)")
    ap.add_argument("--min-seconds", type=float, default=3.0, help="minimum timed duration of each case's run")
    ap.add_argument("--allocator", choices=mdbench.ALLOCATOR, default="both",
                    help="who gets the glibc allocator tunable: both (fair, default), neither, ours-only")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", nargs="*", default=["ethanol", "water192"])
    ap.add_argument("--beads", nargs="*", type=int, default=[8, 16])
    ap.add_argument("--models", nargs="*", default=["schnet", "painn"])
    ap.add_argument("--modes", choices=("eager", "compiled", "both"), default="both", help="spkmd modes to run")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "rpmd.md"))
    ap.add_argument("--worker", nargs=4, metavar=("IMPL", "SYSTEM", "MODEL", "BEADS"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        impl, system, kind, beads = args.worker
        res = WORKERS[impl](system, kind, int(beads), args.min_seconds)
        res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    import schnetpack

    ours_impls = {"eager": ["ours"], "compiled": ["ours-compiled"], "both": ["ours", "ours-compiled"]}[args.modes]
    loads, rows = [], []
    for system in args.systems:
        for kind in args.models:
            for beads in args.beads:
                res = {impl: [] for impl in (*ours_impls, "schnetpack")}
                for _ in range(args.repeats):
                    for impl in res:
                        res[impl].append(run_case(impl, system, kind, beads, args.threads, args.allocator,
                                                  args.min_seconds))
                        loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
                s = [r["step_ms"] for r in res["schnetpack"]]
                med = lambda rs: statistics.median([x for r in rs for x in r])  # noqa: E731
                for impl in ours_impls:
                    o = [r["step_ms"] for r in res[impl]]
                    prov = [r["provider_ms"] for r in res[impl]]
                    row = {
                        "system": f"{system} ({res[impl][0]['n_atoms']} atoms)", "model": kind, "beads": beads,
                        "mode": "compiled" if impl.endswith("compiled") else "eager",
                        "ours": fmt(o, 1), "spk": fmt(s, 1), "speedup": speedup(s, o),
                        "steps_s": f"{1e3 / med(o):.1f} / {1e3 / med(s):.1f}",
                        "timed": f"{sum(map(len, o))} / {sum(map(len, s))}",
                        "provider": fmt(prov, 1),
                        "rss": f"{max(r['rss_mb'] for r in res[impl]):.0f} / {max(r['rss_mb'] for r in res['schnetpack']):.0f}",
                        "rss_ratio": f"{max(r['rss_mb'] for r in res[impl]) / max(r['rss_mb'] for r in res['schnetpack']):.2f}",
                        "warm": f"{statistics.median(r['warmup_s'] for r in res[impl]):.1f}",
                    }
                    rows.append(row)
                    print(row, flush=True)
    lines = [
        "# Ring-polymer MD: spkmd.rpmd vs schnetpack.md 2.2.0",
        "",
        f"Command: `{Path(sys.executable)} benchmarks/rpmd.py --repeats {args.repeats} --threads {args.threads} "
        f"--systems {' '.join(args.systems)} --beads {' '.join(map(str, args.beads))} --models {' '.join(args.models)} "
        f"--modes {args.modes} --allocator {args.allocator} --min-seconds {args.min_seconds:g}`  ",
        f"torch {torch.__version__}, schnetpack {schnetpack.__version__}, float32, {args.threads} threads, RPMD + PILE-L "
        f"{T_K:g} K, time step {TIME_STEP_FS} fs, {platform.machine()}; 1-min load average during the run: "
        f"{min(loads):.1f}-{max(loads):.1f} (2 cores, shared: absolute times are inflated, compare the ratio).  ",
        "ms per RPMD step (all beads): median over every timed step of all rounds (range of the per-round medians), "
        "each step timed by an end-of-step hook inside one long `simulate(n)` call on both sides (SchNetPack's extra "
        "force call at the start of `simulate` is never counted); `speed-up`: SchNetPack ÷ ours (range over rounds); "
        "`timed steps`: ours / SchNetPack; `mode`: spkmd eager (default) "
        "or with `calculator.compile=true`; `provider`: our one-call "
        "evaluation of all beads (skin list + model) without the integrator. Peak RSS per fresh process (ours / SchNetPack); "
        "`warm-up s`: our first steps including compilation. Allocator tunable (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`, "
        f"what `spkmd` sets for itself): `--allocator {args.allocator}`"
        + (" (both codes get it: the fair headline)." if args.allocator == "both" else "."),
        "",
        "| system | model | beads | mode | spkmd ms/step | SchNetPack ms/step | speed-up | steps/s (ours / SchNetPack) "
        "| timed steps | provider ms | peak RSS MB | RSS ratio | warm-up s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['system']} | {r['model']} | {r['beads']} | {r['mode']} | {r['ours']} | {r['spk']} | {r['speedup']} | "
              f"{r['steps_s']} | {r['timed']} | {r['provider']} | {r['rss']} | {r['rss_ratio']} | {r['warm']} |" for r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
