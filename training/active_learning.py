"""Active learning: committee MD -> uncertain frames -> reference labels -> retrain (``spktrain active-learn``).

    spktrain active-learn configs/active_learning/ethanol_tblite.yaml [rounds=3 work_dir=runs/al ...]

One round ``r`` (directory ``WORK/round_<r>/``), each stage skipped when its output exists,
so an interrupted loop resumes where it stopped:

1. ``pool.extxyz``: the initial frames plus every frame labelled in rounds < r;
2. ``committee/``: an ensemble trained on the pool (:mod:`training.ensemble`), ``ensemble.json``;
3. ``eval.json``: force/energy errors of the committee mean on the held-out frames and the
   Spearman rank correlation of the committee force spread with the true force error;
4. ``md/``: one ``spkmd`` call with ``calculator=ensemble`` on ``md.replicas`` start frames side
   by side (any integrator/thermostat via ``md.overrides``); the HDF5 log (positions and
   ``forces_uncertainty`` every ``md.log_every_n_steps``) is the candidate pool;
5. ``selected.json``: :func:`select_frames` (force-spread threshold and/or top-k, minimum
   time separation per molecule; with ``selection.max_forces`` a molecule's frames after its spread
   first reached that bound are dropped: the trajectory left what the committee can follow); a threshold that selects nothing is logged and the loop goes on;
6. ``labels/``: one file per labelled frame (written atomically), ``failed.json`` for frames
   the reference could not label (exception or non-finite result: logged, skipped). On resume
   only frames with neither are computed.

After the last round one more committee is trained and evaluated. ``WORK/rounds.json`` is the
round log; ``WORK/rounds.png`` plots the held-out error and the frames added per round.
With ``baseline.random: true`` the same number of frames per round is also drawn at random from
the same MD (``random_selected.json``, ``random_labels/``) and a second committee is trained on
those (``random_committee/``): the comparison of ``benchmarks/active_learning.py``.

MD runs as a separate ``spkmd`` process (the training package never imports the MD engine);
the HDF5 log is read with h5py (layout in ``spkmd.hooks.loggers``).
"""

from __future__ import annotations

import importlib
import json
import logging
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger(__name__)

HDF5_FORMAT = 1


class ActiveLearningError(RuntimeError):
    """The loop cannot go on; the message names the stage and the problem."""


# ---------------------------------------------------------------------------------- config
DEFAULTS: dict[str, Any] = {
    "work_dir": "runs/active_learning",
    "rounds": 3,
    "seed": 0,
    "initial": {"file": "???", "n_frames": 50, "indices": None},
    "test": {"file": None, "max_frames": 500},
    "committee": {"n_models": 4, "bootstrap": False, "dtype": "float32", "steps_per_model": 1500,
                  "min_epochs": 5, "val_fraction": 0.1, "overrides": []},
    "md": {"replicas": 4, "n_steps": 2000, "time_step_fs": 0.5, "temperature_K": 500.0,
           "log_every_n_steps": 10, "stop_forces_spread": None, "overrides": [], "command": None},
    "selection": {"threshold_forces": None, "top_k": 50, "min_separation_fs": 25.0, "skip_fs": 0.0,
                  "max_forces": None},
    "reference": {"_target_": "???"},
    "baseline": {"random": False},
}


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> DictConfig:
    """The loop config: :data:`DEFAULTS` <- YAML file <- ``key=value`` overrides (relative paths from the cwd)."""
    base = OmegaConf.create(DEFAULTS)
    user = OmegaConf.load(str(path))
    unknown = set(user.keys()) - set(DEFAULTS)
    if unknown:
        raise ActiveLearningError(f"unknown top-level key(s) {sorted(unknown)} in {path}; known: {sorted(DEFAULTS)}")
    cfg = OmegaConf.merge(base, user)
    try:
        cfg.merge_with_dotlist(list(overrides))
    except Exception as err:  # omegaconf raises several error types
        raise ActiveLearningError(f"cannot apply overrides {list(overrides)}: {err}") from err
    for key in ("initial.file", "reference._target_"):
        if OmegaConf.select(cfg, key) in (None, "???"):
            raise ActiveLearningError(f"{key} is required in {path}")
    sel = cfg.selection
    if sel.threshold_forces is None and sel.top_k is None:
        raise ActiveLearningError("selection needs threshold_forces and/or top_k")
    if int(cfg.rounds) < 0:
        raise ActiveLearningError(f"rounds must be >= 0, got {cfg.rounds}")
    return cfg


# ------------------------------------------------------------------------------ reference
def build_reference(spec: dict[str, Any]):
    """An ASE calculator from ``{"_target_": "package.module.Class" (or "module:Class"), **kwargs}``."""
    spec = dict(spec)
    target = spec.pop("_target_", None)
    if not target:
        raise ActiveLearningError("reference._target_ must name an ASE calculator class, e.g. tblite.ase.TBLite")
    module, sep, attr = target.partition(":")
    if not sep:
        module, _, attr = target.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        hint = " (pip install tblite, or the project's [al] extra)" if module.startswith("tblite") else ""
        raise ActiveLearningError(f"cannot import reference calculator {target!r}: {err}{hint}") from err
    return cls(**spec)


def label_frames(
    frames: Sequence[Any],
    ids: Sequence[str],
    reference: Callable[[], Any] | Any,
    out_dir: str | os.PathLike,
    failed_file: str | os.PathLike,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Label ``frames`` with the reference calculator, one file per frame (``out_dir/<id>.extxyz``).

    Frames whose file exists, or that are recorded in ``failed_file``, are not computed again
    (resume). A frame whose calculation raises or returns non-finite energy/forces is recorded in
    ``failed_file`` with the reason and skipped. ``reference`` is a calculator or a factory
    called once, only when something is left to compute.

    Returns ``{"labelled": [ids], "failed": {id: reason}, "computed": n}`` (labelled includes resumed ones).
    """
    import ase.io
    from ase.calculators.singlepoint import SinglePointCalculator

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    failed_file = Path(failed_file)
    failed: dict[str, str] = json.loads(failed_file.read_text()) if failed_file.exists() else {}
    say = progress or log.info
    calc = None
    computed = 0
    labelled = []
    todo = [(f, i) for f, i in zip(frames, ids) if not (out_dir / f"{i}.extxyz").exists() and i not in failed]
    if len(todo) < len(frames):
        say(f"  labelling: {len(frames) - len(todo)} of {len(frames)} frames done before, {len(todo)} to compute")
    for n, (atoms, fid) in enumerate(todo):
        if calc is None:
            calc = reference() if callable(reference) and not hasattr(reference, "get_potential_energy") else reference
        a = atoms.copy()
        a.calc = calc
        try:
            energy = float(a.get_potential_energy())
            forces = np.array(a.get_forces(), dtype=np.float64)
            if not (math.isfinite(energy) and np.isfinite(forces).all()):
                raise ValueError("non-finite energy or forces")
        except Exception as err:  # noqa: BLE001 - any failure of the reference skips the frame, logged
            failed[fid] = f"{type(err).__name__}: {str(err)[:300]}"
            _atomic_write(failed_file, json.dumps(failed, indent=1))
            say(f"  frame {fid}: reference failed ({failed[fid]}); skipped")
            continue
        out = atoms.copy()
        out.calc = SinglePointCalculator(out, energy=energy, forces=forces)
        out.info["al_id"] = fid
        tmp = out_dir / f".{fid}.tmp.extxyz"
        ase.io.write(str(tmp), out, format="extxyz")
        os.replace(tmp, out_dir / f"{fid}.extxyz")
        computed += 1
        if (n + 1) % 25 == 0:
            say(f"  labelled {n + 1}/{len(todo)}")
    for fid in ids:
        if (out_dir / f"{fid}.extxyz").exists():
            labelled.append(fid)
    return {"labelled": labelled, "failed": {k: v for k, v in failed.items() if k in set(ids)}, "computed": computed}


def read_labels(out_dir: str | os.PathLike, ids: Sequence[str]) -> list[Any]:
    """The labelled frames of ``ids`` that exist in ``out_dir`` (in the order of ``ids``)."""
    import ase.io

    out_dir = Path(out_dir)
    return [ase.io.read(str(out_dir / f"{i}.extxyz")) for i in ids if (out_dir / f"{i}.extxyz").exists()]


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


# ------------------------------------------------------------------------------- selection
def select_frames(
    spread: np.ndarray,
    time_fs: np.ndarray,
    threshold: float | None = None,
    top_k: int | None = None,
    min_separation_fs: float = 0.0,
    skip_fs: float = 0.0,
    max_spread: float | None = None,
) -> list[tuple[int, int]]:
    """Pick uncertain frames from an MD log.

    Args:
        spread: [T, M] committee force spread (eV/Å) of molecule m at logged step t.
        time_fs: [T] simulation time of each logged step.
        threshold: keep only frames with spread >= threshold (None: no threshold).
        top_k: keep at most this many (largest spread first; None: all above the threshold).
        min_separation_fs: two selected frames of the same molecule are at least this far apart in time.
        skip_fs: ignore frames before this time (equilibration).
        max_spread: a molecule whose spread reaches this has left the region the committee can
            follow (e.g. a bond broke); its frames from then on are not used (:func:`trusted_mask`).
    Returns:
        ``[(t, m), ...]`` ordered by decreasing spread. Non-finite spreads are never selected.
    """
    spread = np.asarray(spread, dtype=np.float64)
    time_fs = np.asarray(time_fs, dtype=np.float64)
    if spread.ndim != 2 or spread.shape[0] != len(time_fs):
        raise ValueError(f"spread must be [T, M] with T = len(time_fs) = {len(time_fs)}, got {spread.shape}")
    if threshold is None and top_k is None:
        raise ValueError("give a threshold and/or top_k")
    ok = trusted_mask(spread, max_spread) & (time_fs[:, None] >= skip_fs)
    if threshold is not None:
        ok &= spread >= threshold
    t_idx, m_idx = np.nonzero(ok)
    order = np.argsort(-spread[t_idx, m_idx], kind="stable")
    chosen: list[tuple[int, int]] = []
    taken: dict[int, list[float]] = {}
    for k in order:
        t, m = int(t_idx[k]), int(m_idx[k])
        times = taken.setdefault(m, [])
        if any(abs(time_fs[t] - s) < min_separation_fs for s in times):
            continue
        chosen.append((t, m))
        times.append(float(time_fs[t]))
        if top_k is not None and len(chosen) >= top_k:
            break
    return chosen


def trusted_mask(spread: np.ndarray, max_spread: float | None = None) -> np.ndarray:
    """[T, M] bool: finite spread, and (with ``max_spread``) before the molecule first reached ``max_spread``."""
    spread = np.asarray(spread, dtype=np.float64)
    ok = np.isfinite(spread)
    if max_spread is not None:
        over = ~ok | (spread >= max_spread)
        ok &= np.cumsum(over, axis=0) == 0
    return ok


def random_frames(n_steps: int, n_molecules: int, n: int, seed: int, exclude: Sequence[tuple[int, int]] = (),
                  time_fs: np.ndarray | None = None, skip_fs: float = 0.0,
                  allowed: np.ndarray | None = None) -> list[tuple[int, int]]:
    """``n`` distinct (t, m) frames drawn uniformly (without replacement) from an MD log
    (only where ``allowed`` [T, M] is true, e.g. :func:`trusted_mask`)."""
    rng = np.random.default_rng(seed)
    allowed = np.ones((n_steps, n_molecules), dtype=bool) if allowed is None else np.array(allowed, dtype=bool)
    if time_fs is not None:
        allowed &= (np.asarray(time_fs) >= skip_fs)[:, None]
    for t, m in exclude:
        allowed[t, m] = False
    flat = np.flatnonzero(allowed.ravel())
    pick = rng.choice(flat, size=min(n, len(flat)), replace=False)
    return [(int(p // n_molecules), int(p % n_molecules)) for p in pick]


# ---------------------------------------------------------------------------------- MD log
def read_md_log(path: str | os.PathLike) -> dict[str, Any]:
    """Positions [T, M, n, 3] (Å), forces spread [T, M] (eV/Å), time [T] (fs), numbers [N] of an spkmd HDF5 log
    (replica 0; all molecules must have the same number of atoms)."""
    import h5py

    with h5py.File(str(path), "r", swmr=True) as f:
        if int(f.attrs.get("format", -1)) != HDF5_FORMAT:
            raise ActiveLearningError(f"{path}: spkmd log format {f.attrs.get('format')!r}, this code reads {HDF5_FORMAT}")
        n = int(f.attrs["entries"])
        n_atoms = np.asarray(f.attrs["n_atoms"]).reshape(-1)
        if "forces_uncertainty" not in f["properties"]:
            raise ActiveLearningError(f"{path} has no forces_uncertainty: was the MD run with calculator=ensemble?")
        pos = np.asarray(f["molecules/positions"][:n, 0])  # [T, N, 3]
        spread = np.asarray(f["properties/forces_uncertainty"][:n, 0])  # [T, M]
        time_fs = np.asarray(f["properties/time"][:n])
        numbers = np.asarray(f.attrs["atomic_numbers"])
    if len(set(n_atoms.tolist())) != 1:
        raise ActiveLearningError("molecules of different sizes in one MD run are not supported by the selection")
    M, k = len(n_atoms), int(n_atoms[0])
    return {"positions": pos.reshape(n, M, k, 3), "spread": spread, "time_fs": time_fs, "numbers": numbers[:k]}


def run_md(cfg: DictConfig, manifest: Path, starts: list[Any], md_dir: Path, seed: int,
           progress: Callable[[str], None]) -> Path:
    """One ``spkmd`` run of the committee on the start frames side by side; returns the HDF5 log."""
    import ase.io

    md_dir.mkdir(parents=True, exist_ok=True)
    start_file = md_dir / "start.extxyz"
    clean = []
    for a in starts:
        a = a.copy()
        a.calc = None
        a.info = {}
        clean.append(a)
    ase.io.write(str(start_file), clean, format="extxyz")
    md = cfg.md
    cmd = list(md.command) if md.command else [sys.executable, "-m", "spkmd.cli"]
    overrides = [
        f"simulation_dir={md_dir / 'sim'}", "overwrite=true", f"seed={seed}", "plots=false",
        "calculator=ensemble", f"calculator.model_files={manifest}", "calculator.uncertain_frames_file=null",
        f"system.molecule_file={start_file}", "system.index=':'",
        f"system.initializer.temperature={float(md.temperature_K)}",
        f"dynamics.n_steps={int(md.n_steps)}", f"dynamics.integrator.time_step={float(md.time_step_fs)}",
        f"callbacks.hdf5.every_n_steps={int(md.log_every_n_steps)}", "callbacks.hdf5.velocities=false",
        "callbacks.progress=null",
    ]
    if md.stop_forces_spread is not None:
        overrides += [f"calculator.threshold_forces={float(md.stop_forces_spread)}", "calculator.on_exceed=stop"]
    overrides += list(md.overrides or [])
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    t0 = time.perf_counter()
    proc = subprocess.run(cmd + overrides, capture_output=True, text=True, env=env)
    h5 = md_dir / "sim" / "simulation.hdf5"
    if proc.returncode != 0:
        text = proc.stderr + proc.stdout
        if "spread above threshold" in text and h5.exists():
            progress(f"  MD stopped early: committee force spread above md.stop_forces_spread={md.stop_forces_spread} eV/Å")
        else:
            raise ActiveLearningError(f"spkmd failed (exit {proc.returncode}): {text.strip()[-1500:]}")
    if not h5.exists():
        raise ActiveLearningError(f"spkmd wrote no log {h5}")
    progress(f"  MD: {len(starts)} molecules x {int(md.n_steps)} steps in {time.perf_counter() - t0:.0f} s")
    return h5


# ---------------------------------------------------------------------------- committee
def committee_overrides(cfg: DictConfig, pool_file: Path, n_frames: int) -> list[str]:
    """spktrain overrides for one committee on ``pool_file``: a random train/val split of the pool,
    no test split, and ``max_epochs`` from ``committee.steps_per_model``."""
    c = cfg.committee
    n_val = max(1, int(round(float(c.val_fraction) * n_frames)))
    n_train = n_frames - n_val
    user = list(c.overrides or [])
    batch = 10
    for o in user:
        if o.startswith("data.batch_size="):
            batch = int(o.split("=", 1)[1])
    epochs = max(int(c.min_epochs), math.ceil(int(c.steps_per_model) / max(1, math.ceil(n_train / batch))))
    return user + [
        f"data.datapath={pool_file}", f"data.num_train={n_train}", f"data.num_val={n_val}", "data.num_test=0",
        "data.split_mode=random", f"trainer.max_epochs={epochs}", "trainer.max_time=null",
        "trainer.enable_progress_bar=false", "+trainer.enable_model_summary=false", "trainer.early_stopping_patience=null",
        "run.threads=1",
    ]


def train_committee(cfg: DictConfig, pool_file: Path, n_frames: int, out_dir: Path, seed: int,
                    progress: Callable[[str], None]) -> Path:
    """Train (or resume) a committee on the pool; returns its manifest."""
    from training.config import compose_config, resolve
    from training.ensemble import EnsembleOptions, train_ensemble

    manifest = out_dir / "ensemble.json"
    if manifest.exists():
        return manifest
    c = cfg.committee
    tcfg = resolve(compose_config(committee_overrides(cfg, pool_file, n_frames)))
    opts = EnsembleOptions(n_models=int(c.n_models), bootstrap=bool(c.bootstrap), seed=seed, dir=str(out_dir),
                           dtype=str(c.dtype))
    t0 = time.perf_counter()
    quiet = logging.getLogger("pytorch_lightning")
    level = quiet.level
    quiet.setLevel(logging.WARNING)
    try:
        train_ensemble(tcfg, opts, progress=lambda s: progress("  " + s))
    finally:
        quiet.setLevel(level)
    progress(f"  committee of {c.n_models} on {n_frames} frames trained in {time.perf_counter() - t0:.0f} s")
    return manifest


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    """Spearman rank correlation (average ranks for ties)."""
    def ranks(x):
        order = np.argsort(x, kind="stable")
        r = np.empty(len(x))
        r[order] = np.arange(len(x))
        xs = x[order]
        i = 0
        while i < len(x):  # average tied ranks
            j = i
            while j + 1 < len(x) and xs[j + 1] == xs[i]:
                j += 1
            if j > i:
                r[order[i:j + 1]] = (i + j) / 2
            i = j + 1
        return r
    ra, rb = ranks(np.asarray(a, float)), ranks(np.asarray(b, float))
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = math.sqrt(float((ra ** 2).sum() * (rb ** 2).sum()))
    return float((ra * rb).sum() / den) if den > 0 else float("nan")


def evaluate_committee(manifest: Path, frames: Sequence[Any], batch_size: int = 50) -> dict[str, float]:
    """Errors of the committee mean on labelled ``frames`` (eV, eV/Å) and spread-vs-error rank correlation."""
    from spkserve import keys
    from spkserve.batch import Structure
    from spkserve.ensemble import EnsembleRunner

    runner = EnsembleRunner(manifest, dtype="float64", skin_angstrom=0.0)
    f_err, e_err, spread, frame_err = [], [], [], []
    props = [keys.energy, keys.forces, keys.forces_uncertainty]
    for s in range(0, len(frames), batch_size):
        chunk = frames[s:s + batch_size]
        out = runner.compute([Structure.from_atoms(a) for a in chunk], props)
        start = 0
        for b, a in enumerate(chunk):
            n = len(a)
            pred = out[keys.forces][start:start + n].numpy()
            start += n
            diff = pred - a.get_forces()
            f_err.append(diff.reshape(-1))
            e_err.append(float(out[keys.energy][b]) - a.get_potential_energy())
            spread.append(float(out[keys.forces_uncertainty][b]))
            frame_err.append(float(np.linalg.norm(diff, axis=1).max()))
    runner.close()
    f = np.concatenate(f_err)
    e = np.asarray(e_err)
    return {
        "n_frames": len(frames),
        "forces_mae": float(np.abs(f).mean()),
        "forces_rmse": float(np.sqrt((f ** 2).mean())),
        "energy_mae": float(np.abs(e - e.mean()).mean()),  # offset-free (absolute xTB energies)
        "energy_mae_raw": float(np.abs(e).mean()),
        "spread_error_spearman": spearman(np.asarray(spread), np.asarray(frame_err)),
        "mean_forces_spread": float(np.mean(spread)),
    }


# ------------------------------------------------------------------------------------ loop
def _read_frames(path: str, indices=None) -> list[Any]:
    import ase.io

    frames = ase.io.read(str(path), index=":")
    return frames if indices is None else [frames[i] for i in indices]


def _write_pool(path: Path, frames: list[Any]) -> None:
    import ase.io

    if not path.exists():
        tmp = path.with_name(f".{path.name}.tmp.extxyz")
        ase.io.write(str(tmp), frames, format="extxyz")
        os.replace(tmp, path)


def initial_and_test(cfg: DictConfig) -> tuple[list[Any], list[Any], list[int]]:
    """The initial labelled frames and the held-out test frames (shared file's frames not used at start)."""
    import ase.io

    all_frames = ase.io.read(str(cfg.initial.file), index=":")
    rng = np.random.default_rng(int(cfg.seed))
    idx = list(cfg.initial.indices) if cfg.initial.indices is not None else sorted(
        rng.choice(len(all_frames), size=int(cfg.initial.n_frames), replace=False).tolist())
    initial = [all_frames[i] for i in idx]
    if cfg.test.file is None or str(cfg.test.file) == str(cfg.initial.file):
        rest = [i for i in range(len(all_frames)) if i not in set(idx)]
        test_pool = [all_frames[i] for i in rest]
    else:
        test_pool = ase.io.read(str(cfg.test.file), index=":")
    m = cfg.test.max_frames
    if m is not None and len(test_pool) > int(m):
        keep = np.sort(np.random.default_rng(int(cfg.seed) + 1).choice(len(test_pool), size=int(m), replace=False))
        test_pool = [test_pool[i] for i in keep]
    return initial, test_pool, idx


def _frames_from_log(md: dict[str, Any], picks: Sequence[tuple[int, int]], round_no: int, tag: str) -> tuple[list, list]:
    from ase import Atoms

    frames, ids = [], []
    for t, m in picks:
        a = Atoms(numbers=md["numbers"], positions=md["positions"][t, m])
        a.info.update(al_round=round_no, md_time_fs=float(md["time_fs"][t]), md_molecule=int(m),
                      forces_spread_eV_per_A=float(md["spread"][t, m]))
        frames.append(a)
        ids.append(f"{tag}r{round_no}_t{t}_m{m}")
    return frames, ids


def run_loop(cfg: DictConfig, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run or resume the whole loop of ``cfg`` (see the module docstring); returns ``{"log", "plot", "rounds"}``."""
    say = progress or log.info
    work = Path(str(cfg.work_dir)).expanduser().resolve()
    work.mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg, work / "config.yaml")
    initial, test, init_idx = initial_and_test(cfg)
    say(f"active learning in {work}: {len(initial)} initial frames, {len(test)} held-out frames, {cfg.rounds} rounds")
    reference = _LazyReference(dict(OmegaConf.to_container(cfg.reference, resolve=True)))
    log_path = work / "rounds.json"
    rounds: list[dict[str, Any]] = []
    al_labels: list[Any] = []
    rnd_labels: list[Any] = []
    do_random = bool(cfg.baseline.random)
    t_start = time.perf_counter()
    for r in range(int(cfg.rounds) + 1):
        rdir = work / f"round_{r}"
        rdir.mkdir(exist_ok=True)
        say(f"round {r}:")
        t_round = time.perf_counter()
        entry: dict[str, Any] = {"round": r}
        # 1-3: committee on the pool, evaluation
        pool = initial + al_labels
        _write_pool(rdir / "pool.extxyz", pool)
        manifest = train_committee(cfg, rdir / "pool.extxyz", len(pool), rdir / "committee", int(cfg.seed) + 100 * r, say)
        entry["n_labelled"] = len(pool)
        entry["eval"] = _cached_eval(rdir / "eval.json", manifest, test)
        say(f"  held-out force MAE {entry['eval']['forces_mae']:.4f} eV/Å, spread-error Spearman "
            f"{entry['eval']['spread_error_spearman']:.2f} ({len(pool)} labelled frames)")
        if do_random:
            rpool = initial + rnd_labels
            if r == 0:
                entry["random_eval"] = entry["eval"]
            else:
                _write_pool(rdir / "random_pool.extxyz", rpool)
                rman = train_committee(cfg, rdir / "random_pool.extxyz", len(rpool), rdir / "random_committee",
                                       int(cfg.seed) + 100 * r, say)
                entry["random_eval"] = _cached_eval(rdir / "random_eval.json", rman, test)
                say(f"  random baseline: force MAE {entry['random_eval']['forces_mae']:.4f} eV/Å ({len(rpool)} frames)")
            entry["random_n_labelled"] = len(rpool)
        if r == int(cfg.rounds):
            entry["seconds"] = time.perf_counter() - t_round
            rounds.append(entry)
            break
        # 4: MD with the committee
        h5 = rdir / "md" / "sim" / "simulation.hdf5"
        done = rdir / "md" / "done"
        if not done.exists():
            rng = np.random.default_rng(int(cfg.seed) + 7 * r + 1)
            starts = [pool[i] for i in rng.choice(len(pool), size=int(cfg.md.replicas), replace=len(pool) < int(cfg.md.replicas))]
            run_md(cfg, manifest, starts, rdir / "md", int(cfg.seed) + r, say)
            done.write_text("ok\n")
        md = read_md_log(h5)
        # 5: selection
        sel_file = rdir / "selected.json"
        s = cfg.selection
        if sel_file.exists():
            picks = [tuple(p) for p in json.loads(sel_file.read_text())]
        else:
            picks = select_frames(md["spread"], md["time_fs"], s.threshold_forces, s.top_k,
                                  float(s.min_separation_fs), float(s.skip_fs), s.max_forces)
            _atomic_write(sel_file, json.dumps(picks))
        entry["md_frames"] = int(md["spread"].size)
        entry["md_max_spread"] = float(np.nanmax(md["spread"])) if md["spread"].size else float("nan")
        entry["md_trusted_frames"] = int(trusted_mask(md["spread"], s.max_forces).sum())
        if entry["md_trusted_frames"] < entry["md_frames"]:
            say(f"  {entry['md_frames'] - entry['md_trusted_frames']} MD frames not used: their molecule had reached "
                f"selection.max_forces={s.max_forces} eV/Å")
        if not picks:
            say(f"  selection: no frame above threshold_forces={s.threshold_forces} eV/Å "
                f"(largest spread {entry['md_max_spread']:.3f}); nothing to label this round, continuing")
        else:
            say(f"  selection: {len(picks)} of {md['spread'].size} MD frames "
                f"(spread {md['spread'][picks[-1]]:.3f}..{md['spread'][picks[0]]:.3f} eV/Å)")
        # 6: labelling
        frames, ids = _frames_from_log(md, picks, r, "")
        res = label_frames(frames, ids, reference, rdir / "labels", rdir / "failed.json", say)
        new = read_labels(rdir / "labels", res["labelled"])
        al_labels += new
        entry.update(selected=len(picks), added=len(new), failed=len(res["failed"]))
        if res["failed"]:
            say(f"  {len(res['failed'])} frame(s) skipped: reference failed (see {rdir / 'failed.json'})")
        if do_random:
            rsel = rdir / "random_selected.json"
            if rsel.exists():
                rpicks = [tuple(p) for p in json.loads(rsel.read_text())]
            else:
                rpicks = random_frames(md["spread"].shape[0], md["spread"].shape[1], len(new), int(cfg.seed) + 1000 + r,
                                       time_fs=md["time_fs"], skip_fs=float(s.skip_fs),
                                       allowed=trusted_mask(md["spread"], s.max_forces))
                _atomic_write(rsel, json.dumps(rpicks))
            rframes, rids = _frames_from_log(md, rpicks, r, "rand_")
            rres = label_frames(rframes, rids, reference, rdir / "random_labels", rdir / "random_failed.json", say)
            rnd_labels += read_labels(rdir / "random_labels", rres["labelled"])
        entry["seconds"] = time.perf_counter() - t_round
        rounds.append(entry)
        _atomic_write(log_path, json.dumps({"rounds": rounds}, indent=1))
    total = time.perf_counter() - t_start
    _atomic_write(log_path, json.dumps({"rounds": rounds, "wall_seconds_this_call": total}, indent=1))
    plot = plot_rounds(rounds, work / "rounds.png")
    return {"log": log_path, "plot": plot, "rounds": rounds, "work_dir": work, "initial_indices": init_idx}


class _LazyReference:
    """Build the reference calculator on first use (not at all when everything is labelled)."""

    def __init__(self, spec: dict[str, Any]) -> None:
        self.spec = spec
        self._calc = None

    def __call__(self):
        if self._calc is None:
            self._calc = build_reference(self.spec)
        return self._calc


def _cached_eval(path: Path, manifest: Path, test: list[Any]) -> dict[str, float]:
    if path.exists():
        return json.loads(path.read_text())
    res = evaluate_committee(manifest, test)
    _atomic_write(path, json.dumps(res, indent=1))
    return res


def plot_rounds(rounds: list[dict[str, Any]], path: Path) -> Path:
    """Held-out force MAE vs labelled frames (active vs random if present) and frames added per round."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    n = [e["n_labelled"] for e in rounds]
    ax1.plot(n, [e["eval"]["forces_mae"] for e in rounds], "o-", label="active learning")
    if all("random_eval" in e for e in rounds):
        ax1.plot([e["random_n_labelled"] for e in rounds], [e["random_eval"]["forces_mae"] for e in rounds], "s--",
                 label="random frames from the same MD")
    ax1.set_xlabel("labelled frames")
    ax1.set_ylabel("held-out force MAE (eV/Å)")
    ax1.legend()
    ax1.grid(alpha=0.3)
    r = [e["round"] for e in rounds if "selected" in e]
    ax2.bar(r, [e["added"] for e in rounds if "selected" in e], label="labelled")
    ax2.bar(r, [e["failed"] for e in rounds if "selected" in e], bottom=[e["added"] for e in rounds if "selected" in e],
            label="reference failed")
    ax2.set_xlabel("round")
    ax2.set_ylabel("frames selected")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
