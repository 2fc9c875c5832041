"""Neighbor-list benchmark: our ``neighbor_list`` (vesin default, torch backend) against peers.

Water boxes (~1 g/cm^3, random molecule orientations, fixed seed) of 192,
1536, 12288 and 98304 atoms, cutoff 5 Å, full lists with shifts; and a batch
of 64 non-periodic ethanol replicas (9 atoms each). Calls are interleaved
(A B C A B C ...) after a warm-up; the table shows median and min-max ms per
call, and the peak RSS of one call at the largest box measured in a fresh
subprocess per backend.

Run:  .venv/bin/python benchmarks/neighbors.py            (writes benchmarks/results/neighbors.md)
      .venv/bin/python benchmarks/neighbors.py --quick    (two smallest boxes only)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

if "--threads" in sys.argv:  # before numpy/torch/vesin start their thread pools
    os.environ["OMP_NUM_THREADS"] = sys.argv[sys.argv.index("--threads") + 1]
else:
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np
import torch

CUTOFF_ANGSTROM = 5.0
WATER_MOLECULES_PER_A3 = 1.0 / 29.91  # 1 g/cm^3
SIZES = (64, 512, 4096, 32768)  # water molecules on an n^3 grid
RESULTS = Path(__file__).parent / "results" / "neighbors.md"


def water_box(n_molecules: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Positions [3n, 3] (Å) and cubic cell [3, 3] of ``n_molecules`` (a cube number) waters."""
    side = round(n_molecules ** (1 / 3))
    if side**3 != n_molecules:
        raise ValueError(f"n_molecules must be a cube number, got {n_molecules}")
    length = (n_molecules / WATER_MOLECULES_PER_A3) ** (1 / 3)
    a = length / side
    r_oh, angle = 0.9572, math.radians(104.52)
    mol = np.array(
        [[0.0, 0.0, 0.0], [r_oh, 0.0, 0.0], [r_oh * math.cos(angle), r_oh * math.sin(angle), 0.0]]
    )
    mol -= mol.mean(axis=0)
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(n_molecules, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    rot = np.stack(
        [
            np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
            np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
            np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
        ],
        axis=1,
    )  # [n, 3, 3]
    g = np.arange(side) * a + a / 2
    centres = np.stack(np.meshgrid(g, g, g, indexing="ij"), -1).reshape(-1, 3)
    pos = centres[:, None, :] + np.einsum("nij,aj->nai", rot, mol)
    return pos.reshape(-1, 3), np.eye(3) * length


def ethanol_replicas(n_replicas: int, seed: int = 0) -> np.ndarray:
    from ase.build import molecule

    base = molecule("CH3CH2OH").positions
    rng = np.random.default_rng(seed)
    return np.concatenate([base + rng.normal(scale=0.05, size=base.shape) for _ in range(n_replicas)])


# --- candidates ----------------------------------------------------------------


def ours(backend: str, pos: np.ndarray, cells: np.ndarray, pbc: np.ndarray, counts: np.ndarray):
    from spkserve.neighbors import neighbor_list

    P, C, B, N = torch.from_numpy(pos), torch.from_numpy(cells), torch.from_numpy(pbc), torch.from_numpy(counts)
    return lambda: neighbor_list(P, C, B, N, CUTOFF_ANGSTROM, backend)


def raw_vesin(pos, cells, pbc, counts):
    from vesin import NeighborList

    bounds = np.concatenate([[0], np.cumsum(counts)])

    def run():
        for s in range(len(counts)):
            nl = NeighborList(cutoff=CUTOFF_ANGSTROM, full_list=True)
            box = cells[s] if pbc[s].any() else np.zeros((3, 3))
            nl.compute(pos[bounds[s] : bounds[s + 1]], box, bool(pbc[s].any()), "ijS")

    return run


def raw_matscipy(pos, cells, pbc, counts):
    from matscipy.neighbours import neighbour_list

    bounds = np.concatenate([[0], np.cumsum(counts)])

    def run():
        for s in range(len(counts)):
            p = pos[bounds[s] : bounds[s + 1]]
            cell = cells[s] if pbc[s].any() else np.eye(3) * (np.ptp(p, axis=0).max() + 2 * CUTOFF_ANGSTROM)
            neighbour_list("ijS", positions=p, cell=cell, pbc=pbc[s], cutoff=CUTOFF_ANGSTROM)

    return run


def raw_ase(pos, cells, pbc, counts):
    from ase.neighborlist import primitive_neighbor_list

    bounds = np.concatenate([[0], np.cumsum(counts)])

    def run():
        for s in range(len(counts)):
            primitive_neighbor_list(
                "ijS", pbc[s], cells[s], pos[bounds[s] : bounds[s + 1]], CUTOFF_ANGSTROM, self_interaction=False
            )

    return run


CANDIDATES = {
    "ours (vesin, default)": lambda *a: ours("vesin", *a),
    "ours (torch)": lambda *a: ours("torch", *a),
    "ours (matscipy)": lambda *a: ours("matscipy", *a),
    "vesin (raw loop)": raw_vesin,
    "matscipy (raw loop)": raw_matscipy,
    "ase (raw loop)": raw_ase,
}


def interleaved(fns: dict, repeats: int, budget_s: float, min_sample_s: float = 0.02) -> dict:
    """Median/min/max ms per call, candidates interleaved (A B C A B C ...) after one warm-up call each.

    Each sample averages enough calls to last ``min_sample_s``. A candidate whose
    warm-up call exceeds half of ``budget_s`` is skipped; one that would exceed
    the budget over all repeats gets fewer repeats (noted).
    """
    inner, rounds, notes = {}, {}, {}
    for name, fn in fns.items():
        dt = _first(fn)
        if dt > budget_s / 2:
            notes[name] = f"skipped: one call took {dt:.1f} s (budget {budget_s:.0f} s per size)"
            continue
        inner[name] = max(1, int(min_sample_s / max(dt, 1e-7)))
        rounds[name] = min(repeats, max(2, int(budget_s / (dt * inner[name]))))
        if rounds[name] < repeats:
            notes[name] = f"{rounds[name]} repeats only (time budget {budget_s:.0f} s per size)"
    samples = {k: [] for k in fns}
    for r in range(max(rounds.values(), default=0)):
        for name in rounds:
            if r >= rounds[name]:
                continue
            fn, k = fns[name], inner[name]
            t0 = time.perf_counter()
            for _ in range(k):
                fn()
            samples[name].append((time.perf_counter() - t0) / k * 1e3)
    out = {}
    for name in fns:
        s = samples[name]
        out[name] = {
            "median_ms": float(np.median(s)) if s else None,
            "min_ms": float(np.min(s)) if s else None,
            "max_ms": float(np.max(s)) if s else None,
            "n": len(s),
            "note": notes.get(name, ""),
        }
    return out


def _first(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def memory_child(backend: str, n_molecules: int) -> None:
    """Run in a fresh process: RSS before and after one neighbor-list call (MB)."""
    pos, cell = water_box(n_molecules)
    args = (pos, cell[None], np.ones((1, 3), dtype=bool), np.array([len(pos)]))
    fn = CANDIDATES[backend](*args)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before_MB": before, "peak_MB": after, "seconds": seconds}))


def fmt(r: dict) -> str:
    if r["median_ms"] is None:
        return "–"
    return f"{r['median_ms']:.3g} ({r['min_ms']:.3g}–{r['max_ms']:.3g})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="only the two smallest boxes, no memory runs")
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--budget", type=float, default=60.0, help="seconds per candidate and size")
    ap.add_argument("--memory-child", nargs=2, metavar=("CANDIDATE", "N_MOLECULES"), help=argparse.SUPPRESS)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch and OpenMP (vesin) threads; default 1")
    a = ap.parse_args()
    if a.memory_child:
        torch.set_num_threads(a.threads)
        memory_child(a.memory_child[0], int(a.memory_child[1]))
        return

    torch.set_num_threads(a.threads)
    sizes = SIZES[:2] if a.quick else SIZES
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    # memory first: a child started later would inherit this process's large ru_maxrss
    memory = {}
    if not a.quick:
        n_mol = SIZES[-1]
        for name in CANDIDATES:
            if name == "ase (raw loop)":
                memory[name] = {"error": "not measured (one call takes minutes at this size)"}
                continue
            proc = subprocess.run(
                [sys.executable, __file__, "--memory-child", name, str(n_mol), "--threads", str(a.threads)],
                capture_output=True,
                text=True,
            )
            try:
                memory[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            except (IndexError, json.JSONDecodeError):
                memory[name] = {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
            print(f"memory {name}: {memory[name]}", flush=True)
    rows = []
    for n_mol in sizes:
        pos, cell = water_box(n_mol)
        args = (pos, cell[None], np.ones((1, 3), dtype=bool), np.array([len(pos)]))
        n_pairs = int(ours("vesin", *args)()[0].shape[0])
        print(f"water {len(pos)} atoms, {n_pairs} pairs ...", flush=True)
        res = interleaved({k: f(*args) for k, f in CANDIDATES.items()}, a.repeats, a.budget)
        rows.append((f"water {len(pos)}", n_pairs, res))
        print("  " + "; ".join(f"{k}: {fmt(v)}" for k, v in res.items()), flush=True)

    pos = ethanol_replicas(64)
    counts = np.full(64, 9)
    args = (pos, np.zeros((64, 3, 3)), np.zeros((64, 3), dtype=bool), counts)
    n_pairs = int(ours("vesin", *args)()[0].shape[0])
    cands = {k: f(*args) for k, f in CANDIDATES.items()}
    cands["ours (ase)"] = ours("ase", *args)
    res = interleaved(cands, a.repeats * 3, a.budget)
    rows.append(("64 × ethanol (batch)", n_pairs, res))
    print("  " + "; ".join(f"{k}: {fmt(v)}" for k, v in res.items()), flush=True)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    names = list(rows[-1][2])
    lines = [
        "# Neighbor lists: time per call (ms, median and min–max)",
        "",
        f"Command: `.venv/bin/python benchmarks/neighbors.py{' --quick' if a.quick else ''}"
        f"{f' --threads {a.threads}' if a.threads != 1 else ''}`  ",
        f"Cutoff {CUTOFF_ANGSTROM} Å, full list with shifts, float64, {a.threads} thread(s) for torch and vesin "
        f"(matscipy and ASE are single-threaded), {platform.processor() or platform.machine()}, "
        f"{time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}.  ",
        f"/proc/loadavg before: {' '.join(load_before)}, after: {' '.join(load_after)} (2 shared cores: ratios matter, not absolutes).",
        "",
        "| system | pairs | " + " | ".join(names) + " |",
        "| --- | --- | " + " | ".join("---" for _ in names) + " |",
    ]
    for label, n_pairs, res in rows:
        lines.append(f"| {label} | {n_pairs} | " + " | ".join(fmt(res[k]) if k in res else "n/a" for k in names) + " |")
    notes = [f"- {label}, {k}: {v['note']}" for label, _, res in rows for k, v in res.items() if v["note"]]
    if notes:
        lines += ["", "Notes:"] + notes
    if memory:
        lines += ["", f"Peak RSS, one call on water {3 * SIZES[-1]} atoms, fresh process (MB: before the call → peak):", ""]
        lines += ["| candidate | before | peak | increase | time of that call (s) |", "| --- | --- | --- | --- | --- |"]
        for name, m in memory.items():
            if "error" in m:
                lines.append(f"| {name} | – | – | {m['error']} | – |")
            else:
                lines.append(
                    f"| {name} | {m['before_MB']:.0f} | {m['peak_MB']:.0f} | {m['peak_MB'] - m['before_MB']:.0f} | {m['seconds']:.1f} |"
                )
    lines += [
        "",
        "Candidates: `ours (...)` = `spkserve.neighbors.neighbor_list(..., backend=...)` on torch tensors "
        "(includes input checks, cell completion, conversion to torch); `... (raw loop)` = the library called "
        "directly on numpy arrays, one call per system (what a plain per-system loop costs).",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if not a.no_write:
        RESULTS.parent.mkdir(parents=True, exist_ok=True)
        RESULTS.write_text(text)


if __name__ == "__main__":
    main()
