"""Batching of samples: one dict of tensors for several systems."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch

from spkserve import keys

Sample = dict[str, torch.Tensor]

_PAIR_INDEX_KEYS = (keys.idx_i, keys.idx_j)


def collate_atoms(samples: Sequence[Sample]) -> Sample:
    """Concatenate samples into a batch (layout of :mod:`spkserve.keys`).

    Every tensor is concatenated along its first dimension: per-atom values
    ([n, ...]) become [N, ...], per-system values ([1, ...]) become [S, ...],
    pairs [P, ...] become [P_total, ...]. ``pair_i``/``pair_j`` are shifted by
    the atom offset of their system, and ``system_index`` [N] is added.
    All samples must carry the same keys.
    """
    if len(samples) == 0:
        raise ValueError("cannot collate an empty list of samples")
    first = samples[0]
    names = list(first)
    for k, s in enumerate(samples[1:], start=1):
        if len(s) != len(names) or any(n not in s for n in names):
            raise KeyError(
                f"sample {k} has keys {sorted(s)}, sample 0 has {sorted(names)}; every sample must carry the same keys"
            )
    n_atoms = torch.cat([s[keys.n_atoms] for s in samples])  # [S]
    counts = n_atoms.numpy()
    batch: Sample = {}
    for name in names:
        if name in _PAIR_INDEX_KEYS:
            continue
        batch[name] = torch.cat([s[name] for s in samples])
    if keys.idx_i in first:
        offsets = np.cumsum(counts) - counts  # [S] first atom of each system
        n_pairs = [s[keys.idx_i].shape[0] for s in samples]
        pair_offset = torch.from_numpy(np.repeat(offsets, n_pairs))  # [P]
        batch[keys.idx_i] = torch.cat([s[keys.idx_i] for s in samples]) + pair_offset
        batch[keys.idx_j] = torch.cat([s[keys.idx_j] for s in samples]) + pair_offset
    # numpy: torch.repeat_interleave costs milliseconds per call on a busy machine
    batch[keys.idx_m] = torch.from_numpy(np.repeat(np.arange(len(samples), dtype=np.int64), counts))
    return batch
