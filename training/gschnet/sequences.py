"""Partial-molecule sequences ("trajectories") sampled on the fly.

A trajectory of a molecule of n atoms has 2n steps: the first places an atom around the
origin token (an atom within the placement cutoff of the centre of mass; the closest if
none is), then each step picks a focus among the placed, unfinished atoms and either
places one of the focus's unplaced neighbours within the placement cutoff or, if there is
none, predicts *stop* for the focus (which is then finished). As in cG-SchNet, neighbours for
placement must also be closer than ``covalent_radius_factor`` (1.1) times the sum of their
covalent radii, i.e. bonded (``None`` switches that off).

``ordering="random"`` draws foci and next atoms uniformly; ``"canonical"`` takes the
earliest placed unfinished atom as focus and its closest unplaced neighbour (a
breadth-first order). Every epoch draws new trajectories; with ``draw_random_samples=k``
each molecule contributes ``k`` random steps of its trajectory per epoch (0: all steps).
Validation uses a fixed seed per molecule, so its loss is comparable between epochs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch

from spkserve.nn.gschnet import COMPOSITION, N_ATOMS_TARGET, STOP_TYPE
from spkserve.nn.gschnet_sampling import partial_molecule_batch
from training.gschnet.data import Molecule

NEXT_POSITIONS = "next_positions"  # [S, 3] Å (zeros for stop steps)


@dataclass
class Step:
    """One step: the placed atoms (indices into the molecule), the focus (-1: origin), the next atom (-1: stop)."""

    placed: list[int]
    focus: int
    next_atom: int


def placement_neighbors(mol: Molecule, placement_cutoff: float, covalent_radius_factor: float | None = 1.1) -> np.ndarray:
    """Adjacency [n, n] of atoms that may be placed next to each other: closer than the placement
    cutoff and, with ``covalent_radius_factor``, closer than factor * (r_cov,i + r_cov,j) (bonded)."""
    d = mol.distances if mol.distances is not None else np.linalg.norm(
        mol.positions[:, None] - mol.positions[None], axis=-1)
    adj = d < placement_cutoff
    if covalent_radius_factor:
        from ase.data import covalent_radii

        r = covalent_radii[mol.numbers]
        adj &= d < covalent_radius_factor * (r[:, None] + r[None, :])
    np.fill_diagonal(adj, False)
    return adj


def sample_trajectory(mol: Molecule, placement_cutoff: float, rng: np.random.Generator,
                      ordering: str = "random", covalent_radius_factor: float | None = 1.1) -> list[Step]:
    """All 2n steps of one atom-by-atom build of ``mol`` (see module docstring)."""
    if ordering not in ("random", "canonical"):
        raise ValueError(f"ordering must be 'random' or 'canonical', got {ordering!r}")
    d = mol.distances if mol.distances is not None else np.linalg.norm(
        mol.positions[:, None] - mol.positions[None], axis=-1)
    n = mol.n_atoms
    d_origin = np.linalg.norm(mol.positions, axis=-1)
    near = np.nonzero(d_origin < placement_cutoff)[0]
    if near.size == 0 or ordering == "canonical":
        first = int(np.argmin(d_origin))
    else:
        first = int(rng.choice(near))
    steps = [Step([], -1, first)]
    placed = [first]
    is_placed = np.zeros(n, dtype=bool)
    is_placed[first] = True
    unfinished = [first]
    adj = placement_neighbors(mol, placement_cutoff, covalent_radius_factor)
    while unfinished:
        f = unfinished[0] if ordering == "canonical" else unfinished[int(rng.integers(len(unfinished)))]
        cand = np.nonzero(adj[f] & ~is_placed)[0]
        if cand.size == 0:
            steps.append(Step(list(placed), f, -1))
            unfinished.remove(f)
            continue
        nxt = int(cand[np.argmin(d[f, cand])]) if ordering == "canonical" else int(rng.choice(cand))
        steps.append(Step(list(placed), f, nxt))
        placed.append(nxt)
        is_placed[nxt] = True
        unfinished.append(nxt)
    return steps


class StepDataset(torch.utils.data.Dataset):
    """Item i: steps of a freshly sampled trajectory of molecule i (``draw_random_samples`` of them, 0 = all)."""

    def __init__(self, mols: Sequence[Molecule], placement_cutoff: float, draw_random_samples: int = 0,
                 ordering: str = "random", fixed_seed: int | None = None,
                 covalent_radius_factor: float | None = 1.1):
        self.mols = list(mols)
        self.covalent_radius_factor = covalent_radius_factor
        self.placement_cutoff = float(placement_cutoff)
        if draw_random_samples < 0:
            raise ValueError(f"draw_random_samples must be >= 0, got {draw_random_samples}")
        self.draw = int(draw_random_samples)
        self.ordering = ordering
        self.fixed_seed = fixed_seed

    def __len__(self) -> int:
        return len(self.mols)

    def __getitem__(self, i: int) -> tuple[Molecule, list[Step]]:
        if self.fixed_seed is not None:
            rng = np.random.default_rng([self.fixed_seed, i])
        else:
            rng = np.random.default_rng([int(torch.randint(2**31, (1,))), i])
        steps = sample_trajectory(self.mols[i], self.placement_cutoff, rng, self.ordering, self.covalent_radius_factor)
        if self.draw and self.draw < len(steps):
            pick = rng.choice(len(steps), size=self.draw, replace=False)
            steps = [steps[k] for k in sorted(pick)]
        return self.mols[i], steps


class StepCollate:
    """Collate ``(molecule, steps)`` items into one model batch (every step is one "system")."""

    def __init__(self, model_cutoff: float, prediction_cutoff: float, atom_types: Sequence[int],
                 condition_keys: Sequence[str] = ()):
        self.model_cutoff = float(model_cutoff)
        self.prediction_cutoff = float(prediction_cutoff)
        self.atom_types = list(atom_types)
        self.condition_keys = list(condition_keys)

    def __call__(self, items: list[tuple[Molecule, list[Step]]]) -> dict[str, torch.Tensor]:
        numbers, positions, focus, next_z, next_r = [], [], [], [], []
        cond: dict[str, list] = {k: [] for k in self.condition_keys}
        for mol, steps in items:
            z_all = torch.from_numpy(mol.numbers)
            r_all = torch.from_numpy(mol.positions).float()
            counts = [float(np.count_nonzero(mol.numbers == t)) for t in self.atom_types]
            for st in steps:
                idx = torch.tensor(st.placed, dtype=torch.long)
                numbers.append(z_all[idx])
                positions.append(r_all[idx])
                focus.append(st.placed.index(st.focus) if st.focus >= 0 else -1)
                if st.next_atom >= 0:
                    next_z.append(int(mol.numbers[st.next_atom]))
                    next_r.append(r_all[st.next_atom])
                else:
                    next_z.append(STOP_TYPE)
                    next_r.append(torch.zeros(3))
                for k in self.condition_keys:
                    if k == COMPOSITION:
                        cond[k].append(counts)
                    elif k == N_ATOMS_TARGET:
                        cond[k].append(float(mol.n_atoms))
                    else:
                        cond[k].append(mol.properties[k])
        c = {k: torch.tensor(v, dtype=torch.float32) for k, v in cond.items()}
        batch = partial_molecule_batch(numbers, positions, focus, self.model_cutoff, self.prediction_cutoff, c,
                                       torch.tensor(next_z))
        batch[NEXT_POSITIONS] = torch.stack(next_r)
        return batch
