"""Quality of generated molecules: validity, uniqueness, novelty (no Lightning, RDKit optional).

Validity (always available, :func:`valence_check`): bonds from distances (d < 1.2 (r_i +
r_j) with ASE's covalent radii), then bond orders 1-3 are searched so that every atom has
exactly its valence (H 1, C 4, N 3, O 2, F 1, ...), and the molecule must be one
connected fragment. With RDKit installed (``pip install rdkit``), :func:`analyse` uses
``rdDetermineBonds.DetermineBonds`` (neutral molecule) plus sanitisation instead, and
canonical SMILES as identity; without it, the identity is a Weisfeiler-Lehman hash of the
element/bond-order graph.
"""

from __future__ import annotations

import hashlib
from collections import Counter
from typing import Any, Sequence

import numpy as np

VALENCE = {1: 1, 5: 3, 6: 4, 7: 3, 8: 2, 9: 1, 14: 4, 15: 3, 16: 2, 17: 1, 35: 1, 53: 1}
BOND_TOLERANCE = 1.2


def have_rdkit() -> bool:
    try:
        from rdkit.Chem import rdDetermineBonds  # noqa: F401
    except ImportError:
        return False
    return True


def connectivity(numbers: np.ndarray, positions: np.ndarray, tolerance: float = BOND_TOLERANCE) -> np.ndarray:
    """Adjacency matrix [n, n] bool: d_ij < tolerance * (r_cov,i + r_cov,j)."""
    from ase.data import covalent_radii

    r = covalent_radii[numbers]
    d = np.linalg.norm(positions[:, None] - positions[None], axis=-1)
    adj = d < tolerance * (r[:, None] + r[None, :])
    np.fill_diagonal(adj, False)
    return adj


def _connected(adj: np.ndarray) -> bool:
    n = adj.shape[0]
    if n == 0:
        return False
    seen = {0}
    stack = [0]
    while stack:
        i = stack.pop()
        for j in np.nonzero(adj[i])[0]:
            if int(j) not in seen:
                seen.add(int(j))
                stack.append(int(j))
    return len(seen) == n


def bond_orders(numbers: np.ndarray, adj: np.ndarray) -> dict[tuple[int, int], int] | None:
    """Bond orders (1-3) that give every atom its valence exactly, or None if there are none."""
    n = len(numbers)
    if any(int(z) not in VALENCE for z in numbers):
        return None
    need = np.array([VALENCE[int(z)] for z in numbers]) - adj.sum(1)
    if (need < 0).any():
        return None
    edges = [(i, j) for i in range(n) for j in range(i + 1, n) if adj[i, j] and need[i] > 0 and need[j] > 0]
    extra = {e: 0 for e in edges}

    def solve(k: int) -> bool:
        if k == len(edges):
            return not need.any()
        i, j = edges[k]
        # an atom whose remaining edges are all behind k must already be satisfied
        for inc in range(min(2, need[i], need[j]), -1, -1):
            need[i] -= inc
            need[j] -= inc
            extra[(i, j)] = inc
            if _feasible(k + 1) and solve(k + 1):
                return True
            need[i] += inc
            need[j] += inc
        extra[(i, j)] = 0
        return False

    last = {}
    for k, (i, j) in enumerate(edges):
        last[i] = k
        last[j] = k

    def _feasible(k: int) -> bool:
        for a in np.nonzero(need)[0]:
            if last.get(int(a), -1) < k:
                return False
        return True

    if not _feasible(0) or not solve(0):
        return None
    orders = {(i, j): 1 for i in range(n) for j in range(i + 1, n) if adj[i, j]}
    for e, inc in extra.items():
        orders[e] += inc
    return orders


def valence_check(numbers: np.ndarray, positions: np.ndarray) -> tuple[bool, dict | None]:
    """(valid, bond orders): one connected fragment whose atoms all reach their valence."""
    numbers = np.asarray(numbers)
    if numbers.shape[0] < 1:
        return False, None
    adj = connectivity(numbers, np.asarray(positions))
    if not _connected(adj):
        return False, None
    orders = bond_orders(numbers, adj)
    return orders is not None, orders


def graph_hash(numbers: np.ndarray, orders: dict[tuple[int, int], int], iterations: int = 4) -> str:
    """Weisfeiler-Lehman hash of the labelled bond graph (identity without RDKit)."""
    n = len(numbers)
    nbrs: list[list[tuple[int, int]]] = [[] for _ in range(n)]
    for (i, j), o in orders.items():
        nbrs[i].append((j, o))
        nbrs[j].append((i, o))
    labels = [str(int(z)) for z in numbers]
    for _ in range(iterations):
        labels = [hashlib.sha1((labels[i] + "|" + ",".join(sorted(f"{o}:{labels[j]}" for j, o in nbrs[i])))
                               .encode()).hexdigest()[:16] for i in range(n)]
    return hashlib.sha1(",".join(sorted(labels)).encode()).hexdigest()[:20]


def rdkit_smiles(numbers: np.ndarray, positions: np.ndarray) -> str | None:
    """Canonical SMILES from RDKit's bond perception, or None if it fails or gives several fragments."""
    from rdkit import Chem, RDLogger
    from rdkit.Chem import rdDetermineBonds

    RDLogger.DisableLog("rdApp.*")
    xyz = f"{len(numbers)}\n\n" + "\n".join(
        f"{Chem.GetPeriodicTable().GetElementSymbol(int(z))} {p[0]:.6f} {p[1]:.6f} {p[2]:.6f}"
        for z, p in zip(numbers, positions))
    mol = Chem.MolFromXYZBlock(xyz)
    if mol is None:
        return None
    try:
        rdDetermineBonds.DetermineBonds(mol, charge=0)
        Chem.SanitizeMol(mol)
    except Exception:  # RDKit raises assorted errors for geometries it cannot assign
        return None
    smi = Chem.MolToSmiles(Chem.RemoveHs(mol))
    return None if "." in smi else smi


def identify(numbers: np.ndarray, positions: np.ndarray, use_rdkit: bool | None = None) -> str | None:
    """Identity string of a valid molecule (canonical SMILES or graph hash), None if invalid."""
    use_rdkit = have_rdkit() if use_rdkit is None else use_rdkit
    valid, orders = valence_check(numbers, positions)
    if use_rdkit:
        if not valid:
            return None
        return rdkit_smiles(numbers, positions)
    return graph_hash(np.asarray(numbers), orders) if valid else None


def formula(numbers: Sequence[int]) -> str:
    from ase.data import chemical_symbols
    from ase.formula import Formula

    return Formula.from_list([chemical_symbols[int(z)] for z in numbers]).format("hill")


def analyse(numbers: Sequence[np.ndarray], positions: Sequence[np.ndarray], finished: np.ndarray,
            training_ids: set[str] | None = None, use_rdkit: bool | None = None) -> dict[str, Any]:
    """Per-molecule identities and the summary fractions.

    Returns ``{"ids": [...], "valid": [...], "summary": {...}}`` with ``finished``, ``valid``
    (of finished), ``unique`` (of valid), ``novel`` (of unique, if ``training_ids``).
    """
    use_rdkit = have_rdkit() if use_rdkit is None else use_rdkit
    ids: list[str | None] = []
    for z, r, f in zip(numbers, positions, finished):
        ids.append(identify(z, r, use_rdkit) if f else None)
    valid = [i is not None for i in ids]
    n = len(ids)
    n_fin = int(np.sum(finished))
    vids = [i for i in ids if i is not None]
    uniq = set(vids)
    summary = {
        "n_molecules": n,
        "validity_method": "rdkit.DetermineBonds" if use_rdkit else "valence",
        "finished_fraction": n_fin / n if n else 0.0,
        "valid_fraction_of_finished": len(vids) / n_fin if n_fin else 0.0,
        "valid_fraction": len(vids) / n if n else 0.0,
        "unique_fraction_of_valid": len(uniq) / len(vids) if vids else 0.0,
    }
    if training_ids is not None:
        novel = [u for u in uniq if u not in training_ids]
        summary["novel_fraction_of_unique"] = len(novel) / len(uniq) if uniq else 0.0
    summary["mean_n_atoms"] = float(np.mean([len(z) for z in numbers])) if n else 0.0
    summary["top_formulas"] = Counter(formula(z) for z, f in zip(numbers, finished) if f and len(z)).most_common(5)
    return {"ids": ids, "valid": valid, "summary": summary}
