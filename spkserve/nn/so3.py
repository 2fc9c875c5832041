"""Real spherical harmonics (l <= 2) and real Clebsch–Gordan coupling tensors.

Features of degree l are stored in ``(l, m)`` order, flattened to index
l^2 + l + m (m = -l..l), so a feature tensor with ``lmax`` has (lmax+1)^2 rows.
Normalisation: sum_m Y_lm(u)^2 = 2l + 1 for unit vectors u (Y_00 = 1), and the
l = 1 components are sqrt(3) (y, z, x).

The real Clebsch–Gordan tensors C[a, b, c] (a in l1, b in l2, c in l3) are
computed numerically as the one-dimensional space of bilinear maps satisfying
C(D1 y1, D2 y2) = D3 C(y1, y2) for Wigner matrices D_l obtained from the
harmonics themselves, normalised to unit Frobenius norm with a fixed sign (the
first entry above 1e-8 in row-major order is positive), so they are
deterministic and consistent with :func:`real_spherical_harmonics` by construction.
"""

from __future__ import annotations

import math
from functools import lru_cache

import numpy as np
import torch

LMAX_SUPPORTED = 2


def real_spherical_harmonics(u: torch.Tensor, lmax: int) -> torch.Tensor:
    """Real spherical harmonics of unit vectors ``u`` [P, 3] up to ``lmax``.  [P, (lmax+1)^2]"""
    if not 0 <= lmax <= LMAX_SUPPORTED:
        raise ValueError(f"lmax must be between 0 and {LMAX_SUPPORTED}, got {lmax}")
    x, y, z = u.unbind(-1)
    parts = [torch.ones_like(x)]
    if lmax >= 1:
        s3 = math.sqrt(3.0)
        parts += [s3 * y, s3 * z, s3 * x]
    if lmax >= 2:
        s15 = math.sqrt(15.0)
        parts += [
            s15 * x * y,
            s15 * y * z,
            0.5 * math.sqrt(5.0) * (3.0 * z * z - 1.0),
            s15 * x * z,
            0.5 * s15 * (x * x - y * y),
        ]
    return torch.stack(parts, dim=-1)


def _random_rotations(n: int, rng: np.random.Generator) -> list[np.ndarray]:
    out = []
    for _ in range(n):
        q, r = np.linalg.qr(rng.normal(size=(3, 3)))
        q = q * np.sign(np.diag(r))
        if np.linalg.det(q) < 0:
            q[:, 0] = -q[:, 0]
        out.append(q)
    return out


def _sh_block(u: np.ndarray, l: int) -> np.ndarray:
    Y = real_spherical_harmonics(torch.from_numpy(u), l).numpy()
    return Y[:, l * l : (l + 1) ** 2]


def wigner_d(rotation: np.ndarray, l: int, n_points: int = 32) -> np.ndarray:
    """Matrix D_l with Y_l(R u) = D_l Y_l(u) for the real harmonics above.  [2l+1, 2l+1]"""
    rng = np.random.default_rng(1234 + l)
    u = rng.normal(size=(n_points, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    Y = _sh_block(u, l)  # [M, d]
    YR = _sh_block(u @ rotation.T, l)  # [M, d] = Y D^T
    DT = np.linalg.solve(Y.T @ Y, Y.T @ YR)  # least squares by normal equations (tiny, well conditioned)
    return DT.T


@lru_cache(maxsize=None)
def clebsch_gordan(l1: int, l2: int, l3: int) -> np.ndarray:
    """Real coupling tensor C[a, b, c] of degrees (l1, l2) -> l3 (zeros if forbidden)."""
    d1, d2, d3 = 2 * l1 + 1, 2 * l2 + 1, 2 * l3 + 1
    if not abs(l1 - l2) <= l3 <= l1 + l2:
        return np.zeros((d1, d2, d3))
    rng = np.random.default_rng(42)
    rows = []
    for R in _random_rotations(4, rng):
        D1, D2, D3 = wigner_d(R, l1), wigner_d(R, l2), wigner_d(R, l3)
        # C flattened row-major over (a, b, c); C(D1 y1, D2 y2) - D3 C(y1, y2) = 0
        lhs = np.kron(np.kron(D1, D2), np.eye(d3)).T
        rhs = np.kron(np.eye(d1 * d2), D3)
        rows.append(lhs - rhs)
    A = torch.from_numpy(np.concatenate(rows, axis=0))
    # small dense problem: one thread (multithreaded LAPACK is very slow on a busy machine)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        evals, evecs = torch.linalg.eigh(A.T @ A)  # ascending
    finally:
        torch.set_num_threads(n_threads)
    evals, evecs = evals.numpy(), evecs.numpy()
    if evals[0] > 1e-12 or (len(evals) > 1 and evals[1] < 1e-8):
        raise RuntimeError(f"no unique coupling for ({l1}, {l2}, {l3}); eigenvalues {evals[:3]}")
    C = evecs[:, 0].reshape(d1, d2, d3).copy()
    C[np.abs(C) < 1e-10] = 0.0
    C /= np.linalg.norm(C)
    first = C.reshape(-1)[np.argmax(np.abs(C.reshape(-1)) > 1e-8)]
    return C * np.sign(first)


def coupling_paths(lmax: int, parity_invariant: bool = True) -> list[tuple[int, int, int]]:
    """All (l1, l2, l3) with l's <= lmax allowed by the triangle rule (and even l1+l2+l3)."""
    paths = []
    for l1 in range(lmax + 1):
        for l2 in range(lmax + 1):
            for l3 in range(abs(l1 - l2), min(lmax, l1 + l2) + 1):
                if parity_invariant and (l1 + l2 + l3) % 2:
                    continue
                paths.append((l1, l2, l3))
    return paths


def sparse_coupling(lmax: int, parity_invariant: bool = True) -> tuple[torch.Tensor, ...]:
    """Nonzero entries of all couplings up to ``lmax`` in flattened (l, m) indices.

    Returns ``(idx_1, idx_2, idx_out, coeff, path)`` each [K]; ``path`` numbers the
    (l1, l2, l3) path of every entry in :func:`coupling_paths` order.
    """
    i1, i2, io, cf, pth = [], [], [], [], []
    for p, (l1, l2, l3) in enumerate(coupling_paths(lmax, parity_invariant)):
        C = clebsch_gordan(l1, l2, l3)
        for a, b, c in zip(*np.nonzero(C)):
            i1.append(l1 * l1 + a)
            i2.append(l2 * l2 + b)
            io.append(l3 * l3 + c)
            cf.append(C[a, b, c])
            pth.append(p)
    long = lambda v: torch.tensor(v, dtype=torch.long)  # noqa: E731
    return long(i1), long(i2), long(io), torch.tensor(cf, dtype=torch.float64), long(pth)


def degree_of_index(lmax: int) -> torch.Tensor:
    """Degree l of each flattened (l, m) index.  [(lmax+1)^2]"""
    return torch.tensor([l for l in range(lmax + 1) for _ in range(2 * l + 1)], dtype=torch.long)
