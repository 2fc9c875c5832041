"""Structures in, batch dicts out: collation shared by calculators and servers."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Sequence

import numpy as np
import torch

from spkserve import keys


@dataclass
class Structure:
    """One system in Å: ``numbers`` [n], ``positions`` [n, 3], ``cell`` [3, 3] (rows), ``pbc`` [3]."""

    numbers: np.ndarray
    positions: np.ndarray
    cell: np.ndarray
    pbc: np.ndarray

    @classmethod
    def from_atoms(cls, atoms) -> "Structure":
        """From an ``ase.Atoms`` (lengths in Å)."""
        return cls(
            numbers=np.asarray(atoms.numbers, dtype=np.int64),
            positions=np.asarray(atoms.positions, dtype=np.float64),
            cell=np.asarray(atoms.cell.array, dtype=np.float64),
            pbc=np.asarray(atoms.pbc, dtype=bool),
        )

    def __post_init__(self) -> None:
        self.numbers = np.asarray(self.numbers, dtype=np.int64).reshape(-1)
        self.positions = np.asarray(self.positions, dtype=np.float64).reshape(-1, 3)
        self.cell = np.asarray(self.cell, dtype=np.float64).reshape(3, 3)
        self.pbc = np.broadcast_to(np.asarray(self.pbc, dtype=bool), (3,)).copy()
        if len(self.numbers) != len(self.positions):
            raise ValueError(
                f"structure has {len(self.numbers)} atomic numbers but {len(self.positions)} positions"
            )


def collate(
    structures: Sequence[Structure],
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """Concatenate structures into a batch dict without neighbor pairs."""
    if len(structures) == 0:
        raise ValueError("cannot collate an empty list of structures")
    n_atoms = np.array([len(s.numbers) for s in structures], dtype=np.int64)
    batch = {
        keys.Z: torch.from_numpy(np.concatenate([s.numbers for s in structures])),
        keys.R: torch.from_numpy(np.concatenate([s.positions for s in structures])).to(dtype),
        keys.cell: torch.from_numpy(np.stack([s.cell for s in structures])).to(dtype),
        keys.pbc: torch.from_numpy(np.stack([s.pbc for s in structures])),
        keys.n_atoms: torch.from_numpy(n_atoms),
        keys.idx_m: torch.repeat_interleave(torch.arange(len(structures)), torch.from_numpy(n_atoms)),
    }
    return {k: v.to(device) for k, v in batch.items()}


def split_per_system(
    results: dict[str, torch.Tensor], n_atoms: Iterable[int]
) -> list[dict[str, np.ndarray]]:
    """Split batched outputs back into one dict of numpy arrays per system."""
    n_atoms = list(int(n) for n in n_atoms)
    bounds = np.cumsum([0] + n_atoms)
    out: list[dict[str, np.ndarray]] = [{} for _ in n_atoms]
    for name, value in results.items():
        arr = value.detach().cpu().numpy()
        for s in range(len(n_atoms)):
            if name in keys.PER_ATOM_OUTPUTS:
                out[s][name] = arr[bounds[s] : bounds[s + 1]]
            else:
                out[s][name] = arr[s]
    return out
