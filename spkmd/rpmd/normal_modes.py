"""Normal modes of the free ring polymer and their exact / Cayley propagators.

Conventions (as i-PI): ``P`` beads sampled at the bead temperature ``P·T`` with
the ring-polymer Hamiltonian::

    H_P = Σ_j [ p_j²/2m + ½ m ω_P² (q_j − q_{j+1})² + V(q_j) ],   ω_P = P k_B T / ħ

The orthogonal transform ``C`` [P, P] maps bead coordinates to normal modes,
``q̃ = Cᵀ q`` (masses unchanged), with free-ring-polymer frequencies
``ω_k = 2 ω_P sin(kπ/P)``. Mode 0 is the centroid (``q̃_0 = √P · q̄``).

Everything here is in atomic units (ħ = 1): frequencies in 1/au_time.
"""

from __future__ import annotations

import math

import torch

from spkserve import units

SCHEMES = ("exact", "cayley")


def normal_mode_matrix(n_beads: int, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """Real orthogonal bead -> normal-mode matrix ``C[j, k]`` (column k = mode k).  [P, P]"""
    if n_beads < 1:
        raise ValueError(f"the number of beads must be at least 1, got {n_beads}")
    P = n_beads
    j = torch.arange(P, dtype=torch.float64).view(-1, 1)
    k = torch.arange(P, dtype=torch.float64).view(1, -1)
    arg = 2.0 * math.pi * j * k / P
    C = torch.empty(P, P, dtype=torch.float64)
    C[:, 0] = 1.0 / math.sqrt(P)
    for kk in range(1, P):
        if 2 * kk < P:
            C[:, kk] = math.sqrt(2.0 / P) * torch.cos(arg[:, kk])
        elif 2 * kk == P:
            C[:, kk] = torch.tensor([(-1.0) ** jj for jj in range(P)], dtype=torch.float64) / math.sqrt(P)
        else:
            C[:, kk] = math.sqrt(2.0 / P) * torch.sin(arg[:, kk])
    return C.to(dtype)


def ring_polymer_frequency(n_beads: int, temperature_K: float) -> float:
    """ω_P = P k_B T / ħ in 1/au_time."""
    return n_beads * units.KB_HARTREE_PER_K * temperature_K


def normal_mode_frequencies(n_beads: int, temperature_K: float, dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """ω_k = 2 ω_P sin(kπ/P) in 1/au_time.  [P]"""
    wp = ring_polymer_frequency(n_beads, temperature_K)
    k = torch.arange(n_beads, dtype=torch.float64)
    return (2.0 * wp * torch.sin(k * math.pi / n_beads)).to(dtype)


def to_normal_modes(x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Bead tensor [P, ...] -> normal modes [P, ...] (``Cᵀ x``)."""
    P = x.shape[0]
    return (C.transpose(0, 1) @ x.reshape(P, -1)).reshape(x.shape)


def from_normal_modes(x: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
    """Normal modes [P, ...] -> beads [P, ...] (``C x``)."""
    P = x.shape[0]
    return (C @ x.reshape(P, -1)).reshape(x.shape)


def stability_limit_fs(n_beads: int, temperature_K: float, scheme: str) -> float:
    """Largest time step (fs) for which the scheme is stable for the free ring polymer
    combined with external forces (``inf`` if the scheme is unconditionally stable).

    * ``exact``: the exact free propagation, split with the force kicks, is
      resonantly unstable when ω_max Δt reaches π (Korol, Bou-Rabee, Miller,
      J. Chem. Phys. 151, 124103 (2019)); limit π / ω_max.
    * ``cayley``: the Cayley transform of the free propagator is strongly stable
      for every time step (same reference).
    """
    if scheme not in SCHEMES:
        raise ValueError(f"unknown ring-polymer propagation scheme {scheme!r}; use one of {SCHEMES}")
    if n_beads < 2 or scheme == "cayley":
        return math.inf
    w_max = float(normal_mode_frequencies(n_beads, temperature_K).max())
    return math.pi / w_max * units.factor("au_time", "fs")


class FreeRingPolymerPropagator:
    """Propagate the normal modes of a free ring polymer over a time step (in place).

    For mode k (mass m, frequency ω_k) the exact flow is a rotation in phase
    space; the Cayley variant replaces ``exp(Δt A)`` by
    ``(1 − Δt/2 A)⁻¹ (1 + Δt/2 A)``. The centroid (ω_0 = 0) drifts freely.

    Args:
        n_beads: P.
        temperature_K: physical temperature T (sets ω_P = P k_B T/ħ).
        time_step: Δt in au_time.
        scheme: ``"exact"`` or ``"cayley"``.
    """

    def __init__(self, n_beads: int, temperature_K: float, time_step: float, scheme: str = "exact",
                 dtype: torch.dtype = torch.float64, device: str | torch.device = "cpu") -> None:
        if scheme not in SCHEMES:
            raise ValueError(f"unknown ring-polymer propagation scheme {scheme!r}; use one of {SCHEMES}")
        if not temperature_K > 0:
            raise ValueError(f"ring-polymer temperature must be positive, got {temperature_K} K")
        self.n_beads = n_beads
        self.scheme = scheme
        self.time_step = time_step
        w = normal_mode_frequencies(n_beads, temperature_K)  # float64 [P]
        dt = time_step
        if scheme == "exact":
            c = torch.cos(w * dt)
            s_over_w = torch.where(w > 0, torch.sin(w * dt) / torch.where(w > 0, w, 1.0), torch.full_like(w, dt))
            w_s = w * torch.sin(w * dt)
            c_p = c
        else:
            a2w2 = (0.5 * dt * w) ** 2
            den = 1.0 + a2w2
            c = (1.0 - a2w2) / den
            s_over_w = dt / den
            w_s = dt * w * w / den
            c_p = c
        self.C = normal_mode_matrix(n_beads).to(dtype=dtype, device=device)
        self.frequencies = w.to(dtype=dtype, device=device)
        shape = (n_beads, 1, 1)
        self._c = c.view(shape).to(dtype=dtype, device=device)          # q <- c q + (s/ω) p/m
        self._s_over_w = s_over_w.view(shape).to(dtype=dtype, device=device)
        self._w_s = w_s.view(shape).to(dtype=dtype, device=device)      # p <- -m ω s q + c p
        self._c_p = c_p.view(shape).to(dtype=dtype, device=device)

    def to(self, device=None, dtype=None) -> "FreeRingPolymerPropagator":
        for name in ("C", "frequencies", "_c", "_s_over_w", "_w_s", "_c_p"):
            setattr(self, name, getattr(self, name).to(device=device, dtype=dtype))
        return self

    def propagate_modes(self, q_nm: torch.Tensor, p_nm: torch.Tensor, masses3: torch.Tensor,
                        first_mode: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """New (q̃, p̃) for modes ``first_mode..P-1`` (earlier modes returned unchanged).

        q_nm, p_nm: [P, N, 3]; masses3: [1, N, 1].
        """
        sl = slice(first_mode, None)
        q, p = q_nm[sl], p_nm[sl]
        c, sw, ws, cp = self._c[sl], self._s_over_w[sl], self._w_s[sl], self._c_p[sl]
        q_new = c * q + sw * p / masses3
        p_new = cp * p - ws * masses3 * q
        if first_mode == 0:
            return q_new, p_new
        return torch.cat([q_nm[:first_mode], q_new]), torch.cat([p_nm[:first_mode], p_new])

    def propagate(self, positions: torch.Tensor, momenta: torch.Tensor, masses3: torch.Tensor) -> None:
        """Advance bead positions and momenta [P, N, 3] by Δt in place."""
        q = to_normal_modes(positions, self.C)
        p = to_normal_modes(momenta, self.C)
        q, p = self.propagate_modes(q, p, masses3)
        positions.copy_(from_normal_modes(q, self.C))
        momenta.copy_(from_normal_modes(p, self.C))


def spring_energy(positions: torch.Tensor, masses3: torch.Tensor, omega_p: float) -> torch.Tensor:
    """½ m ω_P² |q_j − q_{j+1}|² per bead j and atom, Hartree.  [P, N]"""
    d = positions - torch.roll(positions, shifts=-1, dims=0)
    return 0.5 * omega_p**2 * (masses3 * d * d).sum(-1)
