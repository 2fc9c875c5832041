"""Bare-model benchmark: our SchNet/PaiNN against SchNetPack 2.2.0 (energy + forces per call).

Same sizes as the reference table in BENCHMARKS.md: SchNet (128 features, 6
interactions, 20 Gaussians, cosine cutoff 5 Å) and PaiNN (128 features, 3
interactions, 20 Gaussians), randomly initialised, float32, 2 threads, eval mode
with parameters frozen (as in MD). Systems: ethanol (9 atoms, from
data/xtb/ethanol_gfn2xtb_500K) and water boxes of 192 and 1536 atoms (the
16-molecule periodic xTB water box replicated 2x2x1 and 4x4x2). Both models
get the same exact-cutoff neighbor pairs; calls are interleaved (ours, peer,
ours, ...) after a warm-up, and the table shows medians with min-max. Peak RSS
(VmHWM) is measured in a fresh subprocess per (implementation, system, model).

SchNetPack is not installed in .venv; run in the benchmark venv
(see /work/shared/BENCHMARKS.md) with our package installed editable:

    /work/bench-venv/bin/python benchmarks/models.py            # writes benchmarks/results/models.md
    /work/bench-venv/bin/python benchmarks/models.py --quick    # ethanol and 192 atoms only
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

DATA = Path("/work/shared/data/xtb")
CUTOFF = 5.0
SYSTEMS = {"ethanol": 9, "water192": 192, "water1536": 1536}
N_CALLS = {"ethanol": 200, "water192": 10, "water1536": 3}


def load_system(name: str):
    from ase.io import read

    if name == "ethanol":
        return read(DATA / "ethanol_gfn2xtb_500K.extxyz", index=0)
    water = read(DATA / "water16_pbc_gfn1xtb_300K.extxyz", index=0)
    return water.repeat((2, 2, 1) if name == "water192" else (4, 4, 2))


# ------------------------------------------------------------------ ours
def ours_model(kind: str):
    from spkserve.nn.models import painn_energy_model, schnet_energy_model

    if kind == "schnet":
        m = schnet_energy_model(cutoff=CUTOFF, n_atom_basis=128, n_interactions=6, n_rbf=20)
    else:
        m = painn_energy_model(cutoff=CUTOFF, n_atom_basis=128, n_interactions=3, n_rbf=20)
    m = m.float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def ours_inputs(atoms):
    from spkserve.batch import Structure, collate
    from spkserve.neighbors import add_neighbor_pairs

    return add_neighbor_pairs(collate([Structure.from_atoms(atoms)], dtype=torch.float32), CUTOFF)


def ours_call(model, inputs):
    return model(inputs, ("energy", "forces"))


# ------------------------------------------------------------------ SchNetPack
def spk_model(kind: str):
    import schnetpack as spk

    rbf = spk.nn.GaussianRBF(n_rbf=20, cutoff=CUTOFF)
    if kind == "schnet":
        rep = spk.representation.SchNet(
            n_atom_basis=128, n_interactions=6, radial_basis=rbf, cutoff_fn=spk.nn.CosineCutoff(CUTOFF)
        )
    else:
        rep = spk.representation.PaiNN(
            n_atom_basis=128, n_interactions=3, radial_basis=rbf, cutoff_fn=spk.nn.CosineCutoff(CUTOFF)
        )
    m = spk.model.NeuralNetworkPotential(
        representation=rep,
        input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=128, output_key="energy"), spk.atomistic.Forces()],
    )
    m = m.float().eval()
    for p in m.parameters():
        p.requires_grad_(False)
    return m


def spk_inputs(atoms):
    import schnetpack as spk
    import schnetpack.transform as trn

    conv = spk.interfaces.AtomsConverter(neighbor_list=trn.MatScipyNeighborList(cutoff=CUTOFF), dtype=torch.float32)
    return conv(atoms)


def spk_call(model, inputs):
    return model(dict(inputs))


def ours_compiled_model(kind: str):
    """Our model under torch.compile (inductor, dynamic shapes: pair counts change in MD)."""
    return torch.compile(ours_model(kind), dynamic=True)


IMPLS = {"ours": (ours_model, ours_inputs, ours_call), "schnetpack": (spk_model, spk_inputs, spk_call)}
COMPILED = {"ours_compiled": (ours_compiled_model, ours_inputs, ours_call)}


def one_call_seconds(impl: str, model, inputs) -> float:
    call = IMPLS[impl][2]
    t = time.perf_counter()
    out = call(model, inputs)
    out["forces"].sum().item()
    return time.perf_counter() - t


def peak_rss(impl: str, system: str, kind: str) -> None:
    """Subprocess mode: build, run a few calls, print peak RSS in MB."""
    torch.set_num_threads(2)
    make_model, make_inputs, call = IMPLS[impl]
    model, inputs = make_model(kind), make_inputs(load_system(system))
    for _ in range(2):
        call(model, inputs)
    # VmHWM of this process image: ru_maxrss would include the parent's RSS at fork time
    hwm_kb = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"rss_mb": hwm_kb / 1024}))


def measure_rss(impl: str, system: str, kind: str) -> float:
    out = subprocess.run(
        [sys.executable, __file__, "--rss", impl, system, kind], capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_mb"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="ethanol and 192 atoms only")
    ap.add_argument("--systems", nargs="+", choices=list(SYSTEMS), help="systems to run (default: all)")
    ap.add_argument("--no-rss", action="store_true", help="skip the peak-memory subprocesses")
    ap.add_argument("--compiled", action="store_true", help="also time our ethanol models under torch.compile")
    ap.add_argument("--rss", nargs=3, metavar=("IMPL", "SYSTEM", "MODEL"), help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "models.md"))
    args = ap.parse_args()
    if args.rss:
        peak_rss(*args.rss)
        return
    torch.set_num_threads(2)
    import schnetpack

    systems = args.systems or (["ethanol", "water192"] if args.quick else list(SYSTEMS))
    rows = []
    if args.compiled:
        IMPLS.update(COMPILED)
    for system in systems:
        atoms = load_system(system)
        for kind in ("schnet", "painn"):
            impls = [i for i in IMPLS if system == "ethanol" or i != "ours_compiled"]
            models = {impl: IMPLS[impl][0](kind) for impl in impls}
            inputs = {impl: IMPLS[impl][1](atoms) for impl in impls}
            e = {i: float(IMPLS[i][2](models[i], inputs[i])["energy"].sum()) for i in impls}  # warm-up
            times: dict[str, list[float]] = {i: [] for i in impls}
            for _ in range(N_CALLS[system]):
                for impl in impls:
                    times[impl].append(one_call_seconds(impl, models[impl], inputs[impl]))
            med = {i: statistics.median(t) * 1e3 for i, t in times.items()}
            rss = {} if args.no_rss else {i: measure_rss(i, system, kind) for i in ("ours", "schnetpack")}
            row = dict(
                system=f"{system} ({len(atoms)} atoms, {inputs['ours']['pair_i'].numel()} pairs)",
                model=kind,
                ours=f"{med['ours']:.2f} ({min(times['ours'])*1e3:.2f}-{max(times['ours'])*1e3:.2f})",
                spk=f"{med['schnetpack']:.2f} ({min(times['schnetpack'])*1e3:.2f}-{max(times['schnetpack'])*1e3:.2f})",
                speedup=f"{med['schnetpack'] / med['ours']:.2f}x",
                rss="" if not rss else f"{rss['ours']:.0f} / {rss['schnetpack']:.0f} ({rss['ours']/rss['schnetpack']:.2f})",
            )
            if "ours_compiled" in times:
                t = times["ours_compiled"]
                mc = statistics.median(t) * 1e3
                row["compiled"] = f"{mc:.2f} ({min(t)*1e3:.2f}-{max(t)*1e3:.2f}), {med['schnetpack'] / mc:.2f}x"
            rows.append(row)
            print(row, "energies", e, flush=True)
    load = Path("/proc/loadavg").read_text().split()[:3]
    lines = [
        "# Bare model (energy + forces): ours vs SchNetPack 2.2.0",
        "",
        f"Command: `{Path(sys.executable)} benchmarks/{Path(__file__).name} {' '.join(sys.argv[1:])}`  ",
        f"torch {torch.__version__}, schnetpack {schnetpack.__version__}, float32, 2 threads, "
        f"{platform.processor() or platform.machine()}, load average at the end {' '.join(load)}.  ",
        "Medians of interleaved calls in ms (min-max); peak RSS (MB) of a fresh process per case, ours / SchNetPack (ratio).",
        "",
        "Ours compiled: `torch.compile(model, dynamic=True)` (inductor), timed after compilation, ms and speed-up.",
        "",
        "| system | model | ours ms | SchNetPack ms | speed-up | peak RSS MB | ours compiled |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    lines += [
        f"| {r['system']} | {r['model']} | {r['ours']} | {r['spk']} | {r['speedup']} | {r['rss']} | {r.get('compiled', '')} |"
        for r in rows
    ]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
