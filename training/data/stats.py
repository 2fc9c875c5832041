"""Statistics of a dataset split: per-element offsets and property mean/std."""

from __future__ import annotations

import numpy as np
import torch

from spkserve import keys

from .atoms_db import ASEAtomsData, AtomsDataError


def _gather(dataset: ASEAtomsData, property: str):
    """(atomic numbers per system, values [S, ...] float64, n_atoms [S])."""
    if property not in dataset.load_properties:
        raise AtomsDataError(f"property {property!r} is not loaded (loaded: {dataset.load_properties})")
    Zs, vals, ns = [], [], []
    for s in dataset.iter_raw():
        Zs.append(s[keys.Z].numpy())
        vals.append(s[property].numpy())
        ns.append(int(s[keys.n_atoms][0]))
    if not Zs:
        raise AtomsDataError("cannot compute statistics of an empty split")
    return Zs, vals, np.asarray(ns, dtype=np.float64)


def fit_offsets(
    dataset: ASEAtomsData,
    property: str = keys.energy,
    remove_atomrefs: bool = True,
    remove_mean: bool = True,
    is_extensive: bool = True,
    atomref: torch.Tensor | None = None,
    max_z: int | None = None,
) -> tuple[torch.Tensor | None, float | None]:
    """Fit ``(atomref [max_z+1], mean_per_atom)`` of a per-system property on ``dataset``.

    ``atomref``: given references (e.g. the dataset's single-atom energies) are
    used as they are; otherwise they come from a least-squares fit of the
    property on the composition (minimum-norm solution when compositions are
    linearly dependent, e.g. one molecule: then the fit absorbs the mean and
    ``mean_per_atom`` is ~0). ``mean_per_atom`` is the mean of the residual
    divided by the atom count (not divided if not ``is_extensive``).
    Returns ``None`` for the parts that are switched off.
    """
    Zs, vals, n = _gather(dataset, property)
    y = np.array([float(np.ravel(v)[0]) if np.size(v) == 1 else np.nan for v in vals])
    if np.isnan(y).any():
        raise AtomsDataError(f"offsets can only be fitted for a scalar per-system property; {property!r} is not")
    zmax = max(int(z.max()) for z in Zs)
    if max_z is None:
        max_z = zmax
    elif zmax > max_z:
        raise AtomsDataError(f"the split contains Z={zmax} > max_z={max_z}")
    counts = np.zeros((len(Zs), max_z + 1))
    for s, z in enumerate(Zs):
        counts[s] = np.bincount(z, minlength=max_z + 1)
    ref = None
    if remove_atomrefs:
        if atomref is not None:
            ref = torch.as_tensor(atomref, dtype=torch.float64).reshape(-1)
            if ref.shape[0] < max_z + 1:
                raise AtomsDataError(f"atomrefs of {property!r} cover Z < {ref.shape[0]}, the data has Z={zmax}")
            ref = ref[: max(max_z + 1, ref.shape[0])]
        else:
            present = np.flatnonzero(counts.sum(0) > 0)
            sol, *_ = np.linalg.lstsq(counts[:, present], y, rcond=None)
            full = np.zeros(max_z + 1)
            full[present] = sol
            ref = torch.from_numpy(full)
        y = y - counts @ ref.numpy()[: max_z + 1]
    mean = None
    if remove_mean:
        mean = float(np.mean(y / n if is_extensive else y))
    return ref, mean


def property_stats(
    dataset: ASEAtomsData,
    property: str,
    divide_by_atoms: bool = False,
    offsets: tuple[torch.Tensor | None, float | None] | None = None,
    is_extensive: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation (float64 tensors, shape of one value) of ``property``.

    For per-atom properties statistics run over atoms. For per-system ones,
    ``offsets=(atomref, mean_per_atom)`` are removed first (either may be None)
    and ``divide_by_atoms`` divides each value by its atom count.
    """
    Zs, vals, n = _gather(dataset, property)
    if property in dataset.per_atom_properties:
        x = np.concatenate(vals, axis=0)
    else:
        x = np.concatenate(vals, axis=0).astype(np.float64)  # [S, ...]
        if offsets is not None:
            ref, mean = offsets
            shape = (-1,) + (1,) * (x.ndim - 1)
            if ref is not None:
                r = ref.numpy()
                x = x - np.array([r[z].sum() for z in Zs]).reshape(shape)
            if mean is not None:
                x = x - (mean * n if is_extensive else mean * np.ones_like(n)).reshape(shape)
        if divide_by_atoms:
            x = x / n.reshape((-1,) + (1,) * (x.ndim - 1))
    return torch.from_numpy(np.asarray(x.mean(0))), torch.from_numpy(np.asarray(x.std(0)))
