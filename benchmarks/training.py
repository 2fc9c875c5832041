"""Training benchmark: our training stack against SchNetPack 2.2 on the shared ethanol xTB set.

Setting (BENCHMARKS.md's training reference): the first 1200 frames of
``shared/data/xtb/ethanol_gfn2xtb_500K`` as contiguous blocks 1000 train /
100 val / 100 test (the same split file for both), PaiNN with 128 features,
3 interactions, 20 Gaussians, cosine cutoff 5 Å, one atomwise energy head,
forces by autograd, batch 10, AdamW lr 5e-4 (constant), loss weights
energy:forces 0.01:0.99, energy mean per atom removed, float32, no EMA,
``num_workers=0``, the same number of torch threads. Neighbor lists are cached on both
sides, as a careful user of each does: ours in memory (``NeighborList``), SchNetPack with
its own ``CachedNeighborList`` around ``MatScipyNeighborList`` (built during epoch 1,
which is excluded from the timings on both sides). Each case runs in a fresh
process (peak RSS is that process's ``ru_maxrss``); cases are interleaved
(ours, peer, ours, peer, ...).

Reported per case: median time of a training epoch (train part only, without
the first epoch, which includes warm-up and neighbor-list caching) and of the
validation pass, peak RSS, and test MAE of energy (eV) and forces (eV/Å) of
the raw weights after the same number of epochs.

Run:  .venv/bin/python benchmarks/training.py [--epochs 4] [--repeats 2] [--threads 1]
      [--peer-python /work/bench-venv/bin/python]   (SchNetPack 2.2.0 in that venv, see BENCHMARKS.md)
Writes benchmarks/results/training.md.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# run as a script, this file's directory comes first on sys.path and its name would shadow the package `training`
if sys.path and Path(sys.path[0] or ".").resolve() == HERE:
    sys.path.pop(0)
DATA = HERE.parents[1] / "shared" / "data" / "xtb" / "ethanol_gfn2xtb_500K.extxyz"
if not DATA.exists():
    DATA = Path("/work/shared/data/xtb/ethanol_gfn2xtb_500K.extxyz")
RESULTS = HERE / "results" / "training.md"
N_FRAMES, N_TRAIN, N_VAL, N_TEST, BATCH, CUTOFF, LR = 1200, 1000, 100, 100, 10, 5.0, 5e-4
FEATURES, INTERACTIONS, N_RBF = 128, 3, 20


# ------------------------------------------------------------------ shared helpers
def _split(path: Path) -> None:
    import numpy as np

    np.savez(path, train_idx=np.arange(0, N_TRAIN), val_idx=np.arange(N_TRAIN, N_TRAIN + N_VAL),
             test_idx=np.arange(N_TRAIN + N_VAL, N_FRAMES))


def _timing_callback(pl):
    class EpochTimer(pl.Callback):
        def __init__(self):
            self.train, self.val, self.train_cpu = [], [], []
            self._t = self._v = self._c = 0.0

        def on_train_epoch_start(self, trainer, module):
            self._t = time.perf_counter()
            self._c = time.process_time()

        def on_validation_epoch_start(self, trainer, module):
            self._v = time.perf_counter()
            if self._t:
                self.train.append(self._v - self._t)
                self.train_cpu.append(time.process_time() - self._c)
                self._t = 0.0

        def on_validation_epoch_end(self, trainer, module):
            self.val.append(time.perf_counter() - self._v)

    return EpochTimer()


def _peak_rss_mb() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _mae(pairs):
    import torch

    e = torch.cat([p[0] for p in pairs])
    f = torch.cat([p[1] for p in pairs])
    return float(e.abs().mean()), float(f.abs().mean())


# --------------------------------------------------------------------------- ours
def run_ours(work: Path, epochs: int, compile: bool = False) -> dict:
    import pytorch_lightning as pl
    import torch

    from spkserve.nn.models import painn_energy_model
    from training.data import AtomsDataModule, CastTo32, NeighborList, RemoveOffsets, from_extxyz
    from training.losses import ModelOutput
    from training.task import AtomisticTask

    db = work / "ours.db"
    if not db.exists():
        from_extxyz(DATA, db, energy_unit="eV", forces_unit="eV/Ang", distance_unit="Ang", index=f":{N_FRAMES}")
    dm = AtomsDataModule(db, BATCH, N_TRAIN, N_VAL, N_TEST, split_file=work / "split.npz",
                         transforms=[RemoveOffsets("energy", remove_atomrefs=False), NeighborList(CUTOFF), CastTo32()])
    dm.setup()
    pl.seed_everything(0)
    model = painn_energy_model(cutoff=CUTOFF, n_atom_basis=FEATURES, n_interactions=INTERACTIONS, n_rbf=N_RBF)
    outputs = [ModelOutput("energy", "mse", 0.01, ("mae",)), ModelOutput("forces", "mse", 0.99, ("mae",))]
    task = AtomisticTask(model, outputs, lr=LR, scheduler="none", ema_decay=None, compile=compile)
    timer = _timing_callback(pl)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(task, datamodule=dm)
    model.train()  # raw network energy, compared with the offset-free targets
    pairs = []
    for batch in dm.test_dataloader():
        out = model(batch, properties=("energy", "forces"))
        pairs.append(((out["energy"] - batch["energy"]).detach(), (out["forces"] - batch["forces"]).detach()))
    e_mae, f_mae = _mae(pairs)
    return {"train_s": timer.train, "train_cpu_s": timer.train_cpu, "val_s": timer.val, "energy_mae": e_mae,
            "forces_mae": f_mae}


# ------------------------------------------------------------------ SchNetPack 2.2
def run_peer(work: Path, epochs: int) -> dict:
    import pytorch_lightning as pl
    import schnetpack as spk
    import schnetpack.transform as trn
    import torch
    import torchmetrics
    from ase.io import read

    db = work / "peer.db"
    if not db.exists():
        frames = read(str(DATA), index=f":{N_FRAMES}")
        props = [{"energy": [a.get_potential_energy()], "forces": a.get_forces()} for a in frames]
        data = spk.data.ASEAtomsData.create(str(db), distance_unit="Ang",
                                            property_unit_dict={"energy": "eV", "forces": "eV/Ang"})
        data.add_systems(props, frames)
    dm = spk.data.AtomsDataModule(
        str(db), batch_size=BATCH, num_train=N_TRAIN, num_val=N_VAL, num_test=N_TEST,
        split_file=str(work / "split.npz"),
        # what a careful SchNetPack user does: its own neighbor-list cache (lists computed once, epoch 1)
        transforms=[trn.CachedNeighborList(str(work / f"peer_nbl_cache_{time.time_ns()}"),
                                           trn.MatScipyNeighborList(cutoff=CUTOFF), keep_cache=False),
                    trn.RemoveOffsets("energy", remove_mean=True, remove_atomrefs=False), trn.CastTo32()],
        num_workers=0, pin_memory=False,
    )
    dm.prepare_data()
    dm.setup()
    pl.seed_everything(0)
    rep = spk.representation.PaiNN(n_atom_basis=FEATURES, n_interactions=INTERACTIONS,
                                   radial_basis=spk.nn.GaussianRBF(n_rbf=N_RBF, cutoff=CUTOFF),
                                   cutoff_fn=spk.nn.CosineCutoff(CUTOFF))
    model = spk.model.NeuralNetworkPotential(
        representation=rep, input_modules=[spk.atomistic.PairwiseDistances()],
        output_modules=[spk.atomistic.Atomwise(n_in=FEATURES, output_key="energy"),
                        spk.atomistic.Forces(energy_key="energy", force_key="forces")],
        postprocessors=[trn.CastTo64(), trn.AddOffsets("energy", add_mean=True, add_atomrefs=False)],
    )
    outputs = [
        spk.task.ModelOutput(name="energy", loss_fn=torch.nn.MSELoss(), loss_weight=0.01,
                             metrics={"MAE": torchmetrics.MeanAbsoluteError()}),
        spk.task.ModelOutput(name="forces", loss_fn=torch.nn.MSELoss(), loss_weight=0.99,
                             metrics={"MAE": torchmetrics.MeanAbsoluteError()}),
    ]
    task = spk.task.AtomisticTask(model=model, outputs=outputs, optimizer_cls=torch.optim.AdamW,
                                  optimizer_args={"lr": LR})
    timer = _timing_callback(pl)
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, inference_mode=False,
                         num_sanity_val_steps=0, callbacks=[timer])
    trainer.fit(task, datamodule=dm)
    model.do_postprocessing = False  # offset-free energies, compared with the offset-free targets
    pairs = []
    for batch in dm.test_dataloader():
        target = {k: batch[k].clone() for k in ("energy", "forces")}
        out = model(batch)  # SchNetPack writes its outputs into the batch dict: compare with the copies
        batch = target
        pairs.append(((out["energy"] - batch["energy"]).detach(), (out["forces"] - batch["forces"]).detach()))
    e_mae, f_mae = _mae(pairs)
    return {"train_s": timer.train, "train_cpu_s": timer.train_cpu, "val_s": timer.val, "energy_mae": e_mae,
            "forces_mae": f_mae}


# ------------------------------------------------------------------------- driver
def worker(kind: str, work: Path, epochs: int, threads: int, out: Path) -> None:
    import torch

    torch.set_num_threads(threads)
    if kind == "peer":
        result = run_peer(work, epochs)
    else:
        result = run_ours(work, epochs, compile=kind == "ours-compiled")
    result["peak_rss_mb"] = _peak_rss_mb()
    out.write_text(json.dumps(result))


def _case(python: str, kind: str, work: Path, epochs: int, threads: int) -> dict:
    out = work / f"{kind}_{time.time_ns()}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONPATH=str(HERE.parent))
    cmd = [python, str(Path(__file__).resolve()), "--worker", kind, "--work", str(work), "--epochs", str(epochs),
           "--threads", str(threads), "--out", str(out)]
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL)
    return json.loads(out.read_text())


def _fmt(xs: list[float]) -> str:
    return f"{statistics.median(xs):.2f} ({min(xs):.2f}–{max(xs):.2f})"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--peer-python", default="/work/bench-venv/bin/python")
    ap.add_argument("--compile", action="store_true", help="also run ours with task.compile=true")
    ap.add_argument("--worker", choices=["ours", "ours-compiled", "peer"], help=argparse.SUPPRESS)
    ap.add_argument("--work", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, Path(args.work), args.epochs, args.threads, Path(args.out))
        return
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        _split(work / "split.npz")
        cases = {"ours": (sys.executable, []), "SchNetPack 2.2": (args.peer_python, [])}
        if args.compile:
            cases = {"ours": cases["ours"], "ours (task.compile=true)": (sys.executable, []),
                     "SchNetPack 2.2": cases["SchNetPack 2.2"]}
        kinds = {"ours": "ours", "ours (task.compile=true)": "ours-compiled", "SchNetPack 2.2": "peer"}
        if not Path(args.peer_python).exists():
            print(f"peer python {args.peer_python} not found: running ours only")
            cases.pop("SchNetPack 2.2")
        load = []
        for r in range(args.repeats):
            for name, (python, results) in cases.items():
                load.append(open("/proc/loadavg").read().split()[0])
                res = _case(python, kinds[name], work, args.epochs, args.threads)
                results.append(res)
                print(name, "epoch s:", [round(x, 2) for x in res["train_s"]], "cpu s:",
                      [round(x, 2) for x in res["train_cpu_s"]], "forces MAE", round(res["forces_mae"], 4), flush=True)
    rows = []
    med, med_wall = {}, {}
    for name, (_, results) in cases.items():
        train = [x for r in results for x in r["train_s"][1:]] or [x for r in results for x in r["train_s"]]
        val = [x for r in results for x in r["val_s"][1:]] or [x for r in results for x in r["val_s"]]
        cpu = [x for r in results for x in r["train_cpu_s"][1:]] or [x for r in results for x in r["train_cpu_s"]]
        med[name] = statistics.median(cpu)
        med_wall[name] = statistics.median(train)
        rows.append(
            f"| {name} | {_fmt(cpu)} | {_fmt(train)} | {_fmt(val)} | {max(r['peak_rss_mb'] for r in results):.0f} | "
            f"{statistics.median(r['energy_mae'] for r in results) * 1000:.1f} | "
            f"{statistics.median(r['forces_mae'] for r in results) * 1000:.1f} |"
        )
    speed = ""
    peer = "SchNetPack 2.2"
    for name in med:
        if name != peer and peer in med:
            speed += (f"\n{name}: **{med[peer] / med[name]:.2f}×** less CPU time and **{med_wall[peer] / med_wall[name]:.2f}×** "
                      "less wall time per training epoch than the peer (ratios of medians).")
    speed += "\n" if speed else ""
    text = f"""# Training: ours vs SchNetPack 2.2

PaiNN 128 features / 3 interactions / 20 Gaussians / cosine 5 Å on the first {N_FRAMES} frames of
`shared/data/xtb/ethanol_gfn2xtb_500K` (blocks {N_TRAIN} train / {N_VAL} val / {N_TEST} test, same split file),
batch {BATCH}, AdamW {LR:g} constant, energy:forces 0.01:0.99, float32, no EMA, {args.threads} torch thread(s),
neighbor lists cached on both sides (ours in memory, SchNetPack `CachedNeighborList(MatScipyNeighborList)`),
{args.epochs} epochs per case, {args.repeats} interleaved repeats, each case a fresh process.
Epoch times: median (min–max) over epochs 2..{args.epochs} of every repeat; CPU = process CPU time of the
training part of the epoch (with several threads it exceeds the wall time). Test MAE after {args.epochs} epochs
(raw weights; median over repeats). Load averages seen at case starts: {", ".join(load)}.

| stack | train epoch CPU [s] | train epoch wall [s] | validation wall [s] | peak RSS [MB] | energy MAE [meV] | force MAE [meV/Å] |
| --- | --- | --- | --- | --- | --- | --- |
{chr(10).join(rows)}
{speed}
Command: `.venv/bin/python benchmarks/training.py --epochs {args.epochs} --repeats {args.repeats} --threads {args.threads}{' --compile' if args.compile else ''}`
"""
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
