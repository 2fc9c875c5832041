"""Thermostats for ring polymers, acting on the normal modes at the bead temperature P·T.

Each is a :class:`spkmd.thermostats.Thermostat` (half-steps at ``on_step_begin`` /
``on_step_end``, energy exchanged with the bath accounted per replica, so that
Σ_beads (KE + PE + springs) + bath energy is conserved). Inside a half-step the
momenta are transformed to normal modes (orthogonal, masses unchanged), changed,
and transformed back.

* :class:`PILELocal`  — Langevin on every mode: centroid γ₀ = 1/τ, others γ_k = 2λω_k
  (Ceriotti, Parrinello, Markland, Manolopoulos, J. Chem. Phys. 133, 124104 (2010)).
* :class:`PILEGlobal` — the same, with stochastic velocity rescaling on the centroid.
* :class:`TRPMD`      — thermostatted RPMD: PILE-L on the internal modes only
  (Rossi, Ceriotti, Manolopoulos, J. Chem. Phys. 140, 234116 (2014)).
* :class:`NHCNormalModes` — massive Nosé–Hoover chains per degree of freedom of each
  mode, τ_k = 1/ω_k (centroid τ₀).
* :class:`RPMDGLE`    — one GLE (A, C) applied to every normal mode.
* :class:`PIGLET`     — one GLE per normal mode, matrices read from a file
  (Ceriotti & Manolopoulos, Phys. Rev. Lett. 109, 100604 (2012)).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch

from spkserve import units
from spkmd.rpmd.normal_modes import from_normal_modes, normal_mode_frequencies, normal_mode_matrix, to_normal_modes
from spkmd.system import System
from spkmd.thermostats import NoseHooverChain, Thermostat, ThermostatError, _expm, _positive, read_matrix_sections


class RingPolymerThermostat(Thermostat):
    """Base: sets the bead temperature, the NM matrix and frequencies in :meth:`init_constants`;
    subclasses implement :meth:`half_step_modes` on the NM momenta [P, N, 3]."""

    def init_constants(self, system: System) -> None:
        P = system.n_replicas
        self.n_beads = P
        self.kT_P = self.kT * P  # bead temperature
        kw = dict(dtype=system.dtype, device=system.device)
        self.C_nm = normal_mode_matrix(P).to(**kw)
        self.omega = normal_mode_frequencies(P, self.temperature_K).to(**kw)  # [P]
        self.init_mode_constants(system)

    def init_mode_constants(self, system: System) -> None:
        """Constants that need the NM frequencies (``self.omega``) and ``self.kT_P``."""

    def half_step_modes(self, p_nm: torch.Tensor, system: System) -> torch.Tensor:
        raise NotImplementedError

    def half_step(self, system: System) -> None:
        p_nm = to_normal_modes(system.momenta, self.C_nm)
        p_nm = self.half_step_modes(p_nm, system)
        system.momenta.copy_(from_normal_modes(p_nm, self.C_nm))


class PILELocal(RingPolymerThermostat):
    """PILE-L: Langevin per normal mode.

    Args:
        temperature_K: physical temperature T (modes are thermostatted at P·T).
        time_constant_fs: centroid friction time 1/γ₀.
        damping_factor: λ in γ_k = 2λω_k for the internal modes (0.5 = critical damping).
        thermostat_centroid: False gives TRPMD.
    """

    stochastic = True

    def __init__(self, temperature_K: float, time_constant_fs: float = 100.0, damping_factor: float = 0.5,
                 thermostat_centroid: bool = True) -> None:
        super().__init__(temperature_K)
        self.time_constant = _positive("time_constant_fs", time_constant_fs) * units.factor("fs", "au_time")
        self.damping_factor = _positive("damping_factor", damping_factor)
        self.thermostat_centroid = bool(thermostat_centroid)

    def frictions(self) -> torch.Tensor:
        """γ_k in 1/au_time.  [P]"""
        g = 2.0 * self.damping_factor * self.omega
        g = g.clone()
        g[0] = 1.0 / self.time_constant if self.thermostat_centroid else 0.0
        return g

    def init_mode_constants(self, system: System) -> None:
        c = torch.exp(-self.frictions() * self.half_dt).view(-1, 1, 1)  # [P, 1, 1]
        self.c = c
        self.sigma = torch.sqrt((1.0 - c * c) * self.kT_P * system.masses3)  # [P, N, 1]

    def half_step_modes(self, p_nm: torch.Tensor, system: System) -> torch.Tensor:
        noise = self.normal(p_nm.shape, system)
        return self.c * p_nm + self.sigma * noise


class TRPMD(PILELocal):
    """Thermostatted RPMD: Langevin on the internal modes only (centroid left alone).

    Args:
        temperature_K: physical temperature.
        damping_factor: λ (γ_k = 2λω_k); 0.5 is the usual choice.
    """

    def __init__(self, temperature_K: float, damping_factor: float = 0.5) -> None:
        super().__init__(temperature_K, time_constant_fs=1.0, damping_factor=damping_factor, thermostat_centroid=False)


class PILEGlobal(PILELocal):
    """PILE-G: stochastic velocity rescaling (Bussi) of each molecule's centroid-mode
    kinetic energy, Langevin on the internal modes.

    Args:
        temperature_K: physical temperature.
        time_constant_fs: centroid relaxation time τ₀.
        damping_factor: λ for the internal modes.
    """

    def init_mode_constants(self, system: System) -> None:
        super().init_mode_constants(system)
        self.c0 = math.exp(-self.half_dt / self.time_constant)
        self.nf = (3 * system.n_atoms).to(system.dtype)  # [M]
        self.k_target = 0.5 * self.nf * self.kT_P
        n_max = int(self.nf.max().item())
        self.mask = (torch.arange(max(n_max - 1, 1), device=system.device).view(1, -1)
                     < (self.nf - 1).view(-1, 1)).to(system.dtype)  # [M, n_max-1]

    def half_step_modes(self, p_nm: torch.Tensor, system: System) -> torch.Tensor:
        noise = self.normal(p_nm.shape, system)
        p_int = self.c[1:] * p_nm[1:] + self.sigma[1:] * noise[1:]
        p0 = p_nm[:1]
        K = system.kinetic_energy(p0)[0]  # [M]
        c, Kt, nf = self.c0, self.k_target, self.nf
        r1 = self.normal(K.shape, system)
        rest = self.normal(tuple(self.mask.shape), system)
        s = (rest * rest * self.mask).sum(-1)
        K_new = c * K + (1.0 - c) * Kt * (r1 * r1 + s) / nf + 2.0 * r1 * torch.sqrt(c * (1.0 - c) * K * Kt / nf)
        alpha = torch.sqrt(K_new / K)
        sign = torch.sign(r1 + torch.sqrt(c * nf * K / ((1.0 - c) * Kt)))
        alpha = torch.where(K > 0, alpha * sign, torch.ones_like(alpha))
        p0 = p0 * alpha[system.molecule_index].view(1, -1, 1)
        return torch.cat([p0, p_int])


class NHCNormalModes(NoseHooverChain):
    """Massive Nosé–Hoover chains on every degree of freedom of every normal mode, at the
    bead temperature P·T; internal mode k uses τ_k = 1/ω_k, the centroid ``time_constant_fs``.

    Args:
        temperature_K: physical temperature.
        time_constant_fs: centroid thermostat period τ₀.
        chain_length, n_yoshida, n_steps: as :class:`spkmd.thermostats.NoseHooverChain`.
    """

    def __init__(self, temperature_K: float, time_constant_fs: float = 100.0, chain_length: int = 4,
                 n_yoshida: int = 3, n_steps: int = 1) -> None:
        super().__init__(temperature_K, time_constant_fs, chain_length, per_atom=True, n_yoshida=n_yoshida, n_steps=n_steps)
        self.temperature_physical_K = float(temperature_K)
        self.kT_physical = self.kT

    def init_constants(self, system: System) -> None:
        from spkmd.thermostats import _YOSHIDA

        P = system.n_replicas
        self.kT = self.kT_physical * P  # the chains act at the bead temperature
        kw = dict(dtype=system.dtype, device=system.device)
        self.C_nm = normal_mode_matrix(P).to(**kw)
        w = normal_mode_frequencies(P, self.temperature_physical_K).to(**kw)
        tau = torch.where(w > 0, 1.0 / torch.where(w > 0, w, 1.0), torch.full_like(w, self.time_constant))
        q = (self.kT * tau * tau).view(-1, 1, 1)  # [P, 1, 1] one dof per chain
        self.nf = torch.ones(1, 1, 1, **kw)
        self.Q = [q for _ in range(self.chain_length)]
        # the chains of the fast internal modes need sub-steps: at least 10 per τ_min
        tau_min = float(tau.min())
        n_steps = max(self.n_steps, math.ceil(10.0 * self.half_dt / tau_min))
        self.n_steps_used = n_steps
        self.deltas = [wy * self.half_dt / n_steps for wy in _YOSHIDA[self.n_yoshida]] * n_steps

    def half_step(self, system: System) -> None:
        bead_momenta = system.momenta
        system.momenta = to_normal_modes(bead_momenta, self.C_nm)
        try:
            super().half_step(system)  # acts on system.momenta, here the NM momenta
            bead_momenta.copy_(from_normal_modes(system.momenta, self.C_nm))
        finally:
            system.momenta = bead_momenta

    def extended_energy(self, system: System) -> torch.Tensor:
        """Chain energy per replica and molecule (replica axis = normal mode), Hartree.  [P, M]"""
        return super().extended_energy(system)


# ----------------------------------------------------------------------------------- GLE
def check_gle_matrices(A: np.ndarray, C: np.ndarray, label: str = "") -> None:
    """Raise :class:`ThermostatError` unless A is a valid drift matrix (eigenvalues with
    positive real part, positive-definite symmetric part), C symmetric positive-definite
    and D = A C + C Aᵀ positive semi-definite."""
    where = f" ({label})" if label else ""
    n = A.shape[0]
    if A.shape != (n, n) or C.shape != (n, n):
        raise ThermostatError(f"GLE matrices{where} must be square and of equal size, got A {A.shape}, C {C.shape}")
    if not (np.all(np.isfinite(A)) and np.all(np.isfinite(C))):
        raise ThermostatError(f"GLE matrices{where} contain non-finite numbers")
    ev = np.linalg.eigvals(A)
    if np.any(np.real(ev) <= 0):
        raise ThermostatError(
            f"GLE drift matrix A{where} is not positive-definite: eigenvalues {np.round(ev, 12).tolist()} "
            "must all have positive real parts (check the file and its unit)"
        )
    sym = np.linalg.eigvalsh(0.5 * (A + A.T))
    if np.any(sym < -1e-12 * np.abs(A).max()):
        raise ThermostatError(
            f"GLE drift matrix A{where} is not positive-(semi)definite: its symmetric part has eigenvalue {sym.min():.4g} < 0"
        )
    if not np.allclose(C, C.T, rtol=1e-8, atol=1e-14 * np.abs(C).max()) or np.linalg.eigvalsh(0.5 * (C + C.T)).min() <= 0:
        raise ThermostatError(f"GLE covariance matrix C{where} must be symmetric positive-definite")
    D = A @ C + C @ A.T
    if np.linalg.eigvalsh(0.5 * (D + D.T)).min() < -1e-10 * np.abs(D).max():
        raise ThermostatError(f"GLE diffusion matrix D = A C + C Aᵀ{where} is not positive semi-definite")


def read_mode_matrices(path: str | Path) -> dict[str, tuple[np.ndarray, str | None]]:
    """Stacked A/C matrices (one block per normal mode, or one for all): see
    :func:`spkmd.thermostats.read_matrix_sections`. Returns {name: (array [k, n, n], unit or None)}."""
    return read_matrix_sections(path)


def _convert(mats: np.ndarray, unit: str | None, kind: str) -> np.ndarray:
    if kind == "A":
        return mats * units.factor(unit or "1/au_time", "1/au_time")
    if unit in (None, "K"):
        return mats * units.KB_HARTREE_PER_K
    return mats * units.factor(unit, "Hartree")


class NormalModeGLE(RingPolymerThermostat):
    """GLE on each normal mode k with its own (A_k, C_k); s = (p̃/√m, aux) [P, N, 3, n+1].

    Args:
        temperature_K: physical temperature (C_k defaults to k_B·P·T·1, canonical).
        A: [n+1, n+1] (same for every mode) or [P, n+1, n+1], in 1/au_time.
        C: None (canonical at P·T) or like A, in Hartree.
    """

    stochastic = True
    per_mode = False

    def __init__(self, temperature_K: float, A: np.ndarray, C: np.ndarray | None = None) -> None:
        super().__init__(temperature_K)
        A = np.asarray(A, dtype=np.float64)
        if A.ndim == 2:
            A = A[None]
        if A.ndim != 3 or A.shape[1] != A.shape[2]:
            raise ThermostatError(f"GLE A must be [n, n] or [P, n, n], got shape {A.shape}")
        if C is not None:
            C = np.asarray(C, dtype=np.float64)
            if C.ndim == 2:
                C = C[None]
            if C.shape[1:] != A.shape[1:] or C.shape[0] not in (1, A.shape[0]):
                raise ThermostatError(f"GLE C of shape {C.shape} does not match A of shape {A.shape}")
            C = np.broadcast_to(C, A.shape).copy()
        self.A = A
        self.C_given = C
        self.n_s = A.shape[1]
        for k in range(A.shape[0]):
            # C defaults to kT·1 at the physical temperature for the check (a scale does not change validity)
            check_gle_matrices(A[k], C[k] if C is not None else np.eye(self.n_s) * self.kT,
                               f"mode {k}" if A.shape[0] > 1 else "")

    def mode_matrices(self, P: int) -> tuple[np.ndarray, np.ndarray]:
        A = self.A
        if A.shape[0] == 1:
            A = np.repeat(A, P, axis=0)
        elif A.shape[0] != P:
            raise ThermostatError(
                f"the GLE matrices are given for {A.shape[0]} normal modes but the system has {P} beads "
                "(system.n_replicas); use matrices generated for this bead number"
            )
        if self.C_given is None:
            C = np.repeat(np.eye(self.n_s)[None] * self.kT_P, P, axis=0)
        else:
            C = self.C_given if self.C_given.shape[0] == P else np.repeat(self.C_given[:1], P, axis=0)
        return A, C

    def init_mode_constants(self, system: System) -> None:
        P = system.n_replicas
        A, C = self.mode_matrices(P)
        self.C_modes = C
        Ts, Ss = [], []
        for k in range(P):
            T = _expm(-A[k] * self.half_dt)
            SS = C[k] - T @ C[k] @ T.T
            w, v = np.linalg.eigh(0.5 * (SS + SS.T))
            Ts.append(T.T)
            Ss.append((v @ np.diag(np.sqrt(np.clip(w, 0.0, None)))).T)
        kw = dict(dtype=system.dtype, device=system.device)
        self.T_t = torch.as_tensor(np.stack(Ts), **kw).view(P, 1, 1, self.n_s, self.n_s)
        self.S_t = torch.as_tensor(np.stack(Ss), **kw).view(P, 1, 1, self.n_s, self.n_s)
        self.sqrt_m = torch.sqrt(system.masses3)  # [1, N, 1]

    def init_state(self, system: System) -> None:
        P = system.n_replicas
        shape = tuple(system.momenta.shape) + (self.n_s,)
        chol = torch.as_tensor(np.linalg.cholesky(self.C_modes), dtype=system.dtype, device=system.device)
        s = (self.normal(shape, system).unsqueeze(-2) @ chol.transpose(-1, -2).view(P, 1, 1, self.n_s, self.n_s)).squeeze(-2)
        self.aux = s[..., 1:].contiguous()

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"aux": self.aux}

    def half_step_modes(self, p_nm: torch.Tensor, system: System) -> torch.Tensor:
        s = torch.cat([(p_nm / self.sqrt_m).unsqueeze(-1), self.aux], -1).unsqueeze(-2)  # [P, N, 3, 1, n+1]
        noise = self.normal(s.shape, system)
        s = (s @ self.T_t + noise @ self.S_t).squeeze(-2)
        self.aux = s[..., 1:].contiguous()
        return s[..., 0] * self.sqrt_m


class RPMDGLE(NormalModeGLE):
    """One GLE applied to every normal mode (canonical C = k_B P T unless C is given).

    Args:
        temperature_K: physical temperature.
        A_file: matrix file (:func:`read_mode_matrices`; one A, optional C), or
        A / C: matrices in 1/au_time and Hartree.
    """

    def __init__(self, temperature_K: float, A_file: str | Path | None = None, A: np.ndarray | None = None,
                 C: np.ndarray | None = None) -> None:
        if (A is None) == (A_file is None):
            raise ThermostatError("give exactly one of A_file (matrix file) or A (matrix)")
        if A_file is not None:
            mats = read_mode_matrices(A_file)
            A = _convert(*mats["A"], "A")
            if len(A) != 1:
                raise ThermostatError(f"{A_file}: RPMD-GLE takes one A matrix, the file holds {len(A)}; use PIGLET for per-mode matrices")
            if C is None and "C" in mats:
                C = _convert(*mats["C"], "C")
        super().__init__(temperature_K, A, C)


class PIGLET(NormalModeGLE):
    """PIGLET: one GLE per normal mode, A_k and C_k read from a file with P stacked blocks
    (mode order 0..P-1 as :func:`~spkmd.rpmd.normal_modes.normal_mode_matrix`). The C
    matrices are used as given (they encode the non-equilibrium centroid target).

    Args:
        temperature_K: physical temperature (for the spring frequency; the C of the file sets the targets).
        matrix_file: A (and C) sections, each with P blocks.
    """

    per_mode = True

    def __init__(self, temperature_K: float, matrix_file: str | Path) -> None:
        mats = read_mode_matrices(matrix_file)
        A = _convert(*mats["A"], "A")
        if "C" not in mats:
            raise ThermostatError(f"{matrix_file}: PIGLET needs C matrices (a '# C MATRIX' section) besides A")
        C = _convert(*mats["C"], "C")
        if len(C) != len(A):
            raise ThermostatError(f"{matrix_file}: {len(A)} A blocks but {len(C)} C blocks; give one of each per normal mode")
        super().__init__(temperature_K, A, C)


RPMD_THERMOSTATS = {
    "pile_local": PILELocal,
    "pile_global": PILEGlobal,
    "trpmd": TRPMD,
    "nhc_rpmd": NHCNormalModes,
    "rpmd_gle": RPMDGLE,
    "piglet": PIGLET,
}
