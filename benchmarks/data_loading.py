"""Data-loading benchmark: one training epoch of pure data loading, ours against SchNetPack 2.2.

Setting (as in BENCHMARKS.md's training reference): the first 1200 frames of
``shared/data/xtb/ethanol_gfn2xtb_500K`` (1000 train / 100 val / 100 test),
batch 10, shuffled, transforms = neighbor list (cutoff 5 Å) + remove energy
mean + cast to float32, ``num_workers=0``. An epoch is a full pass over the
training dataloader (no model). Epochs are interleaved (ours, peer, ours, ...)
after a warm-up epoch; the table gives the median and min-max over repeats.

Ours: :class:`training.data.AtomsDataModule` (database read into memory at
setup, neighbor lists precomputed at setup in batched vesin calls, transformed
samples kept in memory after their first use); also shown: our first epoch
after setup and the database-backed path (``in_memory=False``, every sample
read from SQLite and transformed each epoch, neighbor lists recomputed).
Peer: ``schnetpack.data.AtomsDataModule`` with ``RemoveOffsets``, ``CastTo32`` and the
neighbor list a careful SchNetPack user sets up: its own ``CachedNeighborList`` around
``MatScipyNeighborList`` (lists computed once, in the warm-up epoch) - the headline ratio;
the plain ``MatScipyNeighborList`` (recomputed per sample) is a separate row.

Run:  PYTHONPATH=<dir with schnetpack 2.2.0> .venv/bin/python benchmarks/data_loading.py [--repeats 5]
      (SchNetPack 2.2.0 is installed with ``pip install --no-deps --ignore-requires-python --target DIR
      schnetpack==2.2.0 fasteners dirsync progressbar2 python-utils torch-ema``; without it only ours runs)
Writes benchmarks/results/data_loading.md.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import sys

import torch

HERE = Path(__file__).resolve().parent
# benchmarks/training.py would shadow the `training` package for scripts run from this folder
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
DATA = HERE.parents[1] / "shared" / "data" / "xtb" / "ethanol_gfn2xtb_500K.extxyz"
RESULTS = HERE / "results" / "data_loading.md"
N_FRAMES, N_TRAIN, N_VAL, N_TEST, BATCH, CUTOFF = 1200, 1000, 100, 100, 10, 5.0


def epoch_seconds(loader) -> float:
    t = time.perf_counter()
    n = 0
    for batch in loader:
        n += batch["energy"].shape[0] if "energy" in batch else 0
    dt = time.perf_counter() - t
    if n != N_TRAIN:
        raise RuntimeError(f"an epoch delivered {n} systems, expected {N_TRAIN}")
    return dt


def ours(db: Path, split: Path, in_memory: bool = True, cache: bool = True):
    """``cache=False``: nothing cached at all (lists recomputed per sample, samples re-transformed)."""
    from training.data import AtomsDataModule, CastTo32, NeighborList, RemoveOffsets

    dm = AtomsDataModule(
        db, BATCH, N_TRAIN, N_VAL, N_TEST, split_file=split, in_memory=in_memory, cache_samples=cache,
        transforms=[NeighborList(CUTOFF, cache_in_memory=cache), RemoveOffsets("energy", remove_atomrefs=False),
                    CastTo32()],
    )
    dm.setup()
    return dm


def peer(db: Path, split: Path, workdir: Path, cached: bool = True):
    """SchNetPack's data module; ``cached``: neighbor lists through its ``CachedNeighborList``."""
    import schnetpack as spk
    import schnetpack.transform as trn

    nbl = trn.MatScipyNeighborList(cutoff=CUTOFF)
    if cached:
        nbl = trn.CachedNeighborList(str(workdir / f"spk_nbl_cache_{time.time_ns()}"), nbl, keep_cache=False)
    dm = spk.data.AtomsDataModule(
        str(db), batch_size=BATCH, num_train=N_TRAIN, num_val=N_VAL, num_test=N_TEST, split_file=str(split),
        transforms=[nbl,
                    trn.RemoveOffsets("energy", remove_mean=True, remove_atomrefs=False), trn.CastTo32()],
        num_workers=0, property_units={"energy": "eV", "forces": "eV/Ang"}, load_properties=["energy", "forces"],
    )
    dm.prepare_data()
    dm.setup()
    return dm


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--repeats", type=int, default=5, help="interleaved epochs per pipeline (>= 3)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    from ase.io import read

    from training.data import from_atoms_list

    frames = read(str(DATA), index=f":{N_FRAMES}")
    work = Path(tempfile.mkdtemp(prefix="dataload_bench_"))
    db = work / "ours.db"
    from_atoms_list(frames, db, "Ang", {"energy": "eV", "forces": "eV/Ang"})
    split = work / "split.npz"

    from training.data import AtomsDataModule  # noqa: F401  (import pytorch-lightning outside the timing)

    t = time.perf_counter()
    dm = ours(db, split)
    setup_ours = time.perf_counter() - t
    loader = dm.train_dataloader()
    cold = epoch_seconds(loader)
    dm_nocache = ours(db, split, in_memory=False, cache=False)
    loader_nocache = dm_nocache.train_dataloader()

    have_peer = True
    try:
        import schnetpack as spk

        spk_db = work / "spk.db"
        spkds = spk.data.ASEAtomsData.create(str(spk_db), distance_unit="Ang",
                                             property_unit_dict={"energy": "eV", "forces": "eV/Ang"})
        spkds.add_systems(
            [{"energy": [a.get_potential_energy()], "forces": a.get_forces()} for a in frames], frames
        )
        t = time.perf_counter()
        pdm = peer(spk_db, split, work)
        setup_peer = time.perf_counter() - t
        ploader = pdm.train_dataloader()
        epoch_seconds(ploader)  # warm-up: fills SchNetPack's neighbor-list cache
        ploader_nocache = peer(spk_db, split, work, cached=False).train_dataloader()
        epoch_seconds(ploader_nocache)  # warm-up
        version = spk.__version__ if hasattr(spk, "__version__") else "2.2.0"
    except ImportError as err:
        have_peer = False
        print(f"SchNetPack not importable ({err}); measuring ours only")

    epoch_seconds(loader_nocache)  # warm-up
    a, b, c, d = [], [], [], []
    for _ in range(args.repeats):
        a.append(epoch_seconds(loader))
        if have_peer:
            b.append(epoch_seconds(ploader))
            d.append(epoch_seconds(ploader_nocache))
        c.append(epoch_seconds(loader_nocache))

    def fmt(xs):
        return f"{statistics.median(xs):.3f} s ({min(xs):.3f}–{max(xs):.3f})" if xs else "–"

    load = open("/proc/loadavg").read().split()[:3]
    lines = [
        "# Data loading: one epoch of 1000 ethanol frames (batch 10, NL 5 Å, remove mean, float32, 0 workers)",
        "",
        f"Command: `PYTHONPATH=. {sys.executable} benchmarks/data_loading.py --repeats {args.repeats}` "
        "(a venv with SchNetPack 2.2.0, see BENCHMARKS.md); "
        f"torch threads 1; load average at the end {' '.join(load)}. Median (min–max) of {args.repeats} interleaved epochs.",
        "",
        "| pipeline | epoch | per sample |",
        "| --- | --- | --- |",
        f"| ours, in memory, cached samples (steady state) | {fmt(a)} | {statistics.median(a) / N_TRAIN * 1e6:.0f} µs |",
        f"| ours, first epoch after setup (lists precomputed at setup in batched calls) | {cold:.3f} s | {cold / N_TRAIN * 1e6:.0f} µs |",
        f"| ours, from SQLite each time, no caches (vesin per sample) | {fmt(c)} | {statistics.median(c) / N_TRAIN * 1e6:.0f} µs |",
    ]
    if have_peer:
        lines.append(
            f"| SchNetPack {version} AtomsDataModule, CachedNeighborList(MatScipy) (steady state) | {fmt(b)} | "
            f"{statistics.median(b) / N_TRAIN * 1e6:.0f} µs |"
        )
        lines.append(
            f"| SchNetPack {version} AtomsDataModule, MatScipy NL per sample (no cache) | {fmt(d)} | "
            f"{statistics.median(d) / N_TRAIN * 1e6:.0f} µs |"
        )
        lines += ["", f"Speed-up of our steady-state epoch over SchNetPack with its neighbor-list cache (the fair "
                  f"comparison): {statistics.median(b) / statistics.median(a):.1f}x (median ratio); over SchNetPack "
                  f"without the cache: {statistics.median(d) / statistics.median(a):.1f}x. "
                  f"Setup (open, validate, split, statistics): ours {setup_ours:.2f} s, SchNetPack {setup_peer:.2f} s."]
    text = "\n".join(lines) + "\n"
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
