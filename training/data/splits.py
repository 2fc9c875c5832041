"""Train/validation/test splits: random or contiguous blocks, saved to and reused from npz files."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from .atoms_db import AtomsDataError

Split = tuple[np.ndarray, np.ndarray, np.ndarray]


def resolve_count(value: int | float | None, n_total: int, name: str, remaining: int) -> int:
    """A split size given as a count (int >= 1) or a fraction of ``n_total`` (0 < float <= 1).

    ``None`` means all remaining systems.
    """
    if value is None:
        return remaining
    if isinstance(value, bool):
        raise AtomsDataError(f"{name} must be a count or a fraction, got {value!r}")
    if isinstance(value, float) and 0 < value <= 1.0:
        count = int(round(value * n_total))
    elif float(value) == int(value) and int(value) >= 0:
        count = int(value)
    else:
        raise AtomsDataError(f"{name} must be a count >= 0 or a fraction in (0, 1], got {value!r}")
    if count > remaining:
        raise AtomsDataError(
            f"{name}={value!r} asks for {count} systems but only {remaining} of {n_total} are left"
        )
    return count


def make_split(
    n_total: int,
    num_train: int | float,
    num_val: int | float,
    num_test: int | float | None = None,
    mode: str = "random",
    seed: int = 0,
    gap: int = 0,
) -> Split:
    """Indices (train, val, test) into a dataset of ``n_total`` systems.

    ``mode="random"``: a seeded permutation. ``mode="blocks"``: train, val and
    test are contiguous blocks in this order (for correlated MD frames),
    separated by ``gap`` skipped frames. ``num_test=None`` takes the rest.
    Empty train or validation splits are refused.
    """
    if mode not in ("random", "blocks"):
        raise AtomsDataError(f"split_mode must be 'random' or 'blocks', got {mode!r}")
    if gap < 0:
        raise AtomsDataError(f"split gap must be >= 0, got {gap}")
    n_gaps = 2 * gap if mode == "blocks" else 0
    left = n_total - (gap if mode == "blocks" else 0)
    n_train = resolve_count(num_train, n_total, "num_train", max(left, 0))
    left -= n_train
    n_val = resolve_count(num_val, n_total, "num_val", max(left, 0))
    left -= n_val + (gap if mode == "blocks" else 0)
    n_test = resolve_count(num_test, n_total, "num_test", max(left, 0))
    if n_train == 0:
        raise AtomsDataError(f"the training split is empty (num_train={num_train!r}, {n_total} systems)")
    if n_val == 0:
        raise AtomsDataError(f"the validation split is empty (num_val={num_val!r}, {n_total} systems)")
    if n_train + n_val + n_test + n_gaps > n_total:
        raise AtomsDataError(
            f"split needs {n_train}+{n_val}+{n_test} systems plus gaps {n_gaps} but the dataset has {n_total}"
        )
    if mode == "random":
        perm = np.random.default_rng(seed).permutation(n_total)
        return (
            np.sort(perm[:n_train]),
            np.sort(perm[n_train : n_train + n_val]),
            np.sort(perm[n_train + n_val : n_train + n_val + n_test]),
        )
    a = n_train + gap
    b = a + n_val + gap
    return np.arange(0, n_train), np.arange(a, a + n_val), np.arange(b, b + n_test)


def save_split(path: str | os.PathLike, split: Split) -> None:
    """Write ``train_idx``, ``val_idx``, ``test_idx`` to an npz file (atomic replace)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp.npz")
    np.savez(tmp, train_idx=split[0], val_idx=split[1], test_idx=split[2])
    os.replace(tmp, path)


def load_split(path: str | os.PathLike, n_total: int) -> Split:
    """Read a split file and check that its indices fit a dataset of ``n_total`` systems."""
    with np.load(path, allow_pickle=False) as z:
        missing = [k for k in ("train_idx", "val_idx") if k not in z]
        if missing:
            raise AtomsDataError(f"split file {path} lacks {missing} (needs train_idx, val_idx[, test_idx])")
        parts = [np.asarray(z[k], dtype=np.int64).reshape(-1) for k in ("train_idx", "val_idx")]
        parts.append(np.asarray(z["test_idx"], dtype=np.int64).reshape(-1) if "test_idx" in z else np.zeros(0, np.int64))
    for name, idx in zip(("train", "val", "test"), parts):
        if len(idx) and (idx.min() < 0 or idx.max() >= n_total):
            raise AtomsDataError(
                f"split file {path}: {name} indices run to {idx.max()} but the dataset has {n_total} systems "
                "(a split of another dataset?)"
            )
    if len(parts[0]) == 0:
        raise AtomsDataError(f"split file {path}: the training split is empty")
    if len(parts[1]) == 0:
        raise AtomsDataError(f"split file {path}: the validation split is empty")
    overlap = np.intersect1d(parts[0], parts[1]).size + np.intersect1d(parts[0], parts[2]).size
    if overlap:
        raise AtomsDataError(f"split file {path}: {overlap} indices are both in training and in val/test")
    return parts[0], parts[1], parts[2]


def check_split_sizes(path: str | os.PathLike, split: Split, n_total: int, num_train: int | float | None,
                      num_val: int | float | None) -> None:
    """A reused split file must hold the requested ``num_train``/``num_val`` (counts or fractions
    of ``n_total``); otherwise raise naming both (SchNetPack reuses such files silently)."""
    for name, value, idx in (("num_train", num_train, split[0]), ("num_val", num_val, split[1])):
        if value is None:
            continue
        try:
            want = resolve_count(value, n_total, name, n_total)
        except AtomsDataError:
            want = None
        if want != len(idx):
            raise AtomsDataError(
                f"split file {path} has {len(idx)} {name[4:]} systems but data.{name}={value!r} asks for "
                f"{want if want is not None else 'an impossible number of'}; give the sizes of the file "
                f"(data.num_train={len(split[0])} data.num_val={len(split[1])}), or another data.split_file "
                "(a new one is written) to draw a new split"
            )
