"""Batched MD: spkmd against TorchSim (``torch-sim-atomistic``), the same model in one call.

TorchSim is the reference for batched PyTorch MD of many systems in one model call. Both
engines here drive the SAME bundle model (for ethanol the shipped trained PaiNN bundle, so
the molecules stay intact at 300 K; for water the randomly initialised SchNet of
``benchmarks/md.py``; float32) through the same runtime (``spkserve.runtime.ModelRunner``):

* ours: ``spkmd`` (``System`` with all molecules/replicas, ``VelocityVerlet``, optional
  ``Langevin`` 300 K / 100 fs), the ``BundleCalculator`` with its default skin neighbor list;
* TorchSim: its ``SimState``, ``nve`` / ``nvt_langevin`` integrators (same 300 K, friction
  1/(100 fs)) and a ``ModelInterface`` wrapper around the model. TorchSim has no skin list, so
  the wrapper rebuilds the exact-cutoff list every call, as its own model wrappers do - but
  batched over all systems in ONE vesin call (more generous than its per-system loops).

Systems: 1, 8 and 64 ethanol molecules (independent systems), 8 replicas of ethanol, and the
192-atom water box (periodic). NVE and Langevin, time step 0.5 fs. ``--modes compiled`` gives
BOTH engines the compiled model (``ModelRunner(compile=True)``) for batches below its pair
threshold. Each case runs in a fresh process; the engines alternate over ``--repeats`` (>= 3)
rounds; each step is timed inside one long run (our end-of-step hook; one ``update_fn`` call
on TorchSim's side); the allocator tunable goes to both (``md.worker_env``).

    PYTHONPATH=. /work/tsim-venv/bin/python benchmarks/torchsim.py     # writes results/torchsim.md

``/work/tsim-venv``: a copy of the project venv plus ``pip install torch==2.13.0
torch-sim-atomistic`` (0.3.0 is the newest for Python 3.11; see BENCHMARKS.md).
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
import md as mdbench  # noqa: E402  (systems, model bundles, per-step timer, allocator env)

TIME_STEP_FS = 0.5
T_K = 300.0
TAU_FS = 100.0
SYSTEMS = ("ethanol1", "ethanol8", "ethanol64", "ethanol8rep", "water192")
# (warm-up steps, minimum timed steps)
PLAN = {"ethanol1": (20, 200), "ethanol8": (10, 100), "ethanol64": (5, 30), "ethanol8rep": (10, 100),
        "water192": (3, 20)}


SHIPPED = Path(__file__).resolve().parents[1] / "spkserve" / "data" / "ethanol-painn.bundle"


def bundle_path(kind: str, directory: Path) -> Path:
    """``shipped``: the trained ethanol PaiNN bundle (physical dynamics); ``schnet``/``painn``:
    the random models of ``benchmarks/md.py`` (their molecules heat up: fine for periodic water)."""
    return SHIPPED if kind == "shipped" else mdbench.ours_bundle(kind, directory)


def molecules(name: str) -> tuple[list, int]:
    """(ASE molecules, replicas) of a benchmark system."""
    if name.startswith("ethanol"):
        from ase.io import read

        frames = read(mdbench.DATA / "ethanol_gfn2xtb_500K.extxyz", index=":64")
        if name == "ethanol8rep":
            return [frames[0]], 8
        return frames[: int(name.removeprefix("ethanol"))], 1
    return [mdbench.load_system("water192")], 1


def ours_worker(system_name: str, kind: str, dynamics: str, min_seconds: float, compiled: bool) -> dict:
    from spkmd.calculators import BundleCalculator
    from spkmd.initializers import MaxwellBoltzmann
    from spkmd.integrators import VelocityVerlet
    from spkmd.simulator import Simulator
    from spkmd.system import System
    from spkmd.thermostats import Langevin

    mols, replicas = molecules(system_name)
    with tempfile.TemporaryDirectory() as d:
        path = bundle_path(kind, Path(d))
        calc = BundleCalculator(path, dtype="float32", stress=False, compile=compiled)
    system = System.from_atoms(mols, n_replicas=replicas, dtype=torch.float32)
    MaxwellBoltzmann(T_K)(system, torch.Generator().manual_seed(0))
    timer = mdbench.step_timer("ours")
    hooks = [Langevin(T_K, TAU_FS)] if dynamics == "langevin" else []
    sim = Simulator(system, VelocityVerlet(TIME_STEP_FS), calc, hooks=[*hooks, timer], seed=0)
    warm_s, step_ms = mdbench.time_steps(sim, timer, *PLAN[system_name], min_seconds)
    return {"step_ms": step_ms, "warmup_s": warm_s, "n_atoms": int(system.n_atoms_total) * replicas,
            "n_systems": len(mols) * replicas, "T_K": float(system.temperature().mean())}


def torchsim_model(kind: str, compiled: bool):
    """The bundle model as a TorchSim ``ModelInterface`` (exact list rebuilt every call)."""
    from torch_sim.models.interface import ModelInterface

    from spkserve import keys
    from spkserve.runtime import ModelRunner

    class BundleModel(ModelInterface):
        def __init__(self, runner: ModelRunner):
            super().__init__()
            self.runner = runner
            self._device, self._dtype = torch.device("cpu"), torch.float32
            self._compute_forces, self._compute_stress = True, False

        def forward(self, state, **kwargs) -> dict[str, torch.Tensor]:
            n_atoms = torch.bincount(state.system_idx, minlength=state.n_systems)
            pbc = torch.full((state.n_systems, 3), bool(state.pbc), dtype=torch.bool)
            out = self.runner.compute_tensors(state.atomic_numbers, state.positions, state.row_vector_cell, pbc,
                                              n_atoms, (keys.energy, keys.forces))
            return {"energy": out[keys.energy], "forces": out[keys.forces]}

    with tempfile.TemporaryDirectory() as d:
        path = bundle_path(kind, Path(d))
        runner = ModelRunner(path, dtype="float32", skin_angstrom=0.0, compile=compiled)
    return BundleModel(runner)


def torchsim_worker(system_name: str, kind: str, dynamics: str, min_seconds: float, compiled: bool) -> dict:
    import torch_sim as ts
    from torch_sim.units import MetalUnits

    mols, replicas = molecules(system_name)
    atoms = [m.copy() for m in mols for _ in range(replicas)]
    model = torchsim_model(kind, compiled)
    state = ts.initialize_state(atoms, torch.device("cpu"), torch.float32)
    dt = torch.tensor(TIME_STEP_FS * 1e-3 * MetalUnits.time, dtype=torch.float32)
    kT = torch.tensor(T_K * MetalUnits.temperature, dtype=torch.float32)
    if dynamics == "langevin":
        gamma = torch.tensor(1.0 / (TAU_FS * 1e-3 * MetalUnits.time), dtype=torch.float32)
        init_fn, update_fn = ts.integrators.nvt_langevin(model=model, dt=dt, kT=kT, gamma=gamma, seed=0)
    else:
        init_fn, update_fn = ts.integrators.nve(model=model, dt=dt, kT=kT, seed=0)
    state = init_fn(state)
    warm, min_steps = PLAN[system_name]
    t0 = time.perf_counter()
    stamps = []
    for _ in range(warm):
        state = update_fn(state, kT=kT) if dynamics == "langevin" else update_fn(state)
        stamps.append(time.perf_counter())
    warm_s = time.perf_counter() - t0
    recent = [(b - a) * 1e3 for a, b in zip(stamps[-max(2, warm // 2):], stamps[-max(2, warm // 2) + 1:])]
    estimate = statistics.median(recent) if recent else warm_s * 1e3 / max(warm, 1)
    n = min(mdbench.MAX_TIMED_STEPS, max(min_steps, int(min_seconds * 1e3 / max(estimate, 1e-3)))) + 1
    stamps = [time.perf_counter()]
    for _ in range(n):
        state = update_fn(state, kT=kT) if dynamics == "langevin" else update_fn(state)
        stamps.append(time.perf_counter())
    step_ms = [(b - a) * 1e3 for a, b in zip(stamps[1:], stamps[2:])]  # drop the first, as on our side
    T = float(ts.quantities.calc_kT(masses=state.masses, momenta=state.momenta,
                                    system_idx=state.system_idx).mean() / MetalUnits.temperature)
    return {"step_ms": step_ms, "warmup_s": warm_s, "n_atoms": int(state.positions.shape[0]),
            "n_systems": int(state.n_systems), "T_K": T}


def run_case(impl: str, system: str, kind: str, dynamics: str, mode: str, threads: int, min_seconds: float) -> dict:
    out = subprocess.run(
        [sys.executable, __file__, "--worker", impl, system, kind, dynamics, mode, "--threads", str(threads),
         "--min-seconds", str(min_seconds)],
        capture_output=True, text=True, env=mdbench.worker_env(impl, "both"),
    )
    if out.returncode != 0:
        raise RuntimeError(f"{impl} {system} {kind} {dynamics} {mode} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3, help="rounds of (ours, TorchSim) per case (>= 3)")
    ap.add_argument("--min-seconds", type=float, default=2.0, help="minimum timed duration of each case's run")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--systems", nargs="*", default=list(SYSTEMS), choices=SYSTEMS)
    ap.add_argument("--models", nargs="*", default=["shipped", "schnet"],
                    help="shipped (trained ethanol PaiNN; ethanol systems only), schnet, painn (random; water only "
                         "unless --random-molecules)")
    ap.add_argument("--random-molecules", action="store_true", help="also run random models on ethanol")
    ap.add_argument("--dynamics", nargs="*", default=["nve", "langevin"])
    ap.add_argument("--modes", nargs="*", default=["eager"], choices=("eager", "compiled"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "torchsim.md"))
    ap.add_argument("--worker", nargs=5, metavar=("IMPL", "SYSTEM", "MODEL", "DYNAMICS", "MODE"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.worker:
        impl, system, kind, dynamics, mode = args.worker
        fn = ours_worker if impl == "ours" else torchsim_worker
        res = fn(system, kind, dynamics, args.min_seconds, mode == "compiled")
        res["rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(json.dumps(res))
        return
    import importlib.metadata

    version = importlib.metadata.version("torch-sim-atomistic")
    loads, rows = [], []
    for system in args.systems:
        for kind in args.models:
            if (kind == "shipped") != system.startswith("ethanol") and not (args.random_molecules and kind != "shipped"):
                continue  # trained model for ethanol, random models for water
            for dynamics in args.dynamics:
                for mode in args.modes:
                    res = {"ours": [], "torchsim": []}
                    for _ in range(args.repeats):
                        for impl in res:
                            res[impl].append(run_case(impl, system, kind, dynamics, mode, args.threads, args.min_seconds))
                            loads.append(float(Path("/proc/loadavg").read_text().split()[0]))
                    o = [r["step_ms"] for r in res["ours"]]
                    t = [r["step_ms"] for r in res["torchsim"]]
                    med = lambda rs: statistics.median([x for r in rs for x in r])  # noqa: E731
                    first = res["ours"][0]
                    row = {
                        "system": f"{system} ({first['n_systems']} systems, {first['n_atoms']} atoms)",
                        "model": kind, "dyn": dynamics, "mode": mode,
                        "ours": mdbench.fmt(o), "ts": mdbench.fmt(t), "speedup": mdbench.speedup(t, o),
                        "steps_s": f"{1e3 / med(o):.0f} / {1e3 / med(t):.0f}",
                        "timed": f"{sum(map(len, o))} / {sum(map(len, t))}",
                        "T": f"{statistics.median(r['T_K'] for r in res['ours']):.0f} / "
                             f"{statistics.median(r['T_K'] for r in res['torchsim']):.0f}",
                        "rss": f"{max(r['rss_mb'] for r in res['ours']):.0f} / {max(r['rss_mb'] for r in res['torchsim']):.0f}",
                    }
                    rows.append(row)
                    print(row, flush=True)
    cmd = (f"PYTHONPATH=. {sys.executable} benchmarks/torchsim.py --repeats {args.repeats} --threads {args.threads} "
           f"--min-seconds {args.min_seconds:g} --systems {' '.join(args.systems)} --models {' '.join(args.models)} "
           f"--dynamics {' '.join(args.dynamics)} --modes {' '.join(args.modes)}")
    lines = [
        f"# Batched MD: spkmd vs TorchSim {version} (same bundle model, same runtime)",
        "",
        f"Command: `{cmd}`  ",
        f"torch {torch.__version__}, torch-sim-atomistic {version}, float32, {args.threads} threads, time step "
        f"{TIME_STEP_FS} fs, {platform.machine()}; 1-min load average during the run: {min(loads):.1f}-{max(loads):.1f} "
        "(2 cores, shared).  ",
        "ms per MD step of the whole batch: median over every timed step of all rounds (range of the per-round "
        "medians), each step timed inside one long run on both sides; `speed-up`: TorchSim ÷ ours (range over "
        "rounds). Both engines call the same model through `ModelRunner`; ours with its skin neighbor list, "
        "TorchSim's wrapper with an exact list rebuilt each call (batched, one vesin call). `mode compiled`: both "
        "engines get the compiled model. Allocator tunable for both. `T`: mean temperature at the end (ours / "
        "TorchSim), a sanity check that both integrate the same thing. Peak RSS of a fresh process per case.",
        "",
        "| system | model | dynamics | mode | spkmd ms/step | TorchSim ms/step | speed-up | steps/s (ours / TorchSim) "
        "| timed steps | T K | peak RSS MB |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [f"| {r['system']} | {r['model']} | {r['dyn']} | {r['mode']} | {r['ours']} | {r['ts']} | {r['speedup']} | "
              f"{r['steps_s']} | {r['timed']} | {r['T']} | {r['rss']} |" for r in rows]
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
