"""Thermostats: hooks that act on the momenta for half a time step before and after
the integrator (on_step_begin / on_step_end; the simulator calls the end points in
reverse order so the two half-steps wrap the integrator symmetrically).

Each thermostat implements ONE narrow method, :meth:`Thermostat.half_step`
(momenta over ``self.half_dt`` atomic time units, in place). The base class keeps
account of the energy exchanged with the bath: before and after every half-step it
adds the loss of kinetic energy to :attr:`Thermostat.energy` [R, M] (Hartree), so
``KE + PE + thermostat energy`` is conserved (up to the integration error) for every
thermostat, as in i-PI.

Random numbers come from ``simulator.generator`` (checkpointed), drawn on the CPU.

Available: :class:`Berendsen`, :class:`Langevin` (Bussi–Parrinello / OBABO),
:class:`StochasticVelocityRescaling` (Bussi), :class:`NoseHooverChain`
(Suzuki–Yoshida, chain per molecule or per degree of freedom), :class:`GLE`.
"""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import torch

from spkserve import units
from spkmd.hooks.base import Hook
from spkmd.system import System


class ThermostatError(ValueError):
    """Bad thermostat parameters or input files (message names the problem)."""


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise ThermostatError(f"{name} must be a positive number, got {value!r}")
    return float(value)


class Thermostat(Hook):
    """Base: half-steps at ``on_step_begin``/``on_step_end`` with energy accounting.

    Args:
        temperature_K: target temperature.
    """

    #: True if the thermostat draws random numbers
    stochastic = False
    #: True if it acts on every atom separately (Langevin, GLE, massive NHC): it does not conserve
    #: the centre-of-mass and angular momenta, so the temperature counts all 3N degrees of freedom
    acts_per_atom = False

    def __init__(self, temperature_K: float) -> None:
        self.temperature_K = _positive("temperature_K", temperature_K)
        self.kT = self.temperature_K * units.KB_HARTREE_PER_K  # Hartree
        # Σ over half-steps of (p_before² - p_after²) per replica, atom and component; the bath
        # energy is 0.5 * this / m summed per molecule (reduced only when asked for)
        self.exchanged: torch.Tensor | None = None  # [R, N, 3]
        self.generator: torch.Generator | None = None
        self.half_dt: float | None = None
        self._loaded: dict | None = None
        self._system: System | None = None

    # -- the narrow method --------------------------------------------------------
    def half_step(self, system: System) -> None:
        """Propagate the momenta over ``self.half_dt`` (in place)."""
        raise NotImplementedError

    # -- setup ----------------------------------------------------------------------
    def setup(self, system: System, time_step: float, generator: torch.Generator | None = None) -> None:
        """Prepare for ``system`` and an integrator time step (atomic time units)."""
        self.half_dt = 0.5 * float(time_step)
        self._system = system
        if self.acts_per_atom:
            # COM translation/rotation removed at the start come back under this thermostat
            system.dof = 3.0 * system.n_atoms.to(system.dtype)
        if generator is not None:
            self.generator = generator
        elif self.generator is None:
            self.generator = torch.Generator().manual_seed(0)
        self.init_constants(system)
        if self._loaded is not None:
            self._restore(self._loaded, system)
            self._loaded = None
        elif self.exchanged is None or self.exchanged.shape != system.positions.shape:
            self.exchanged = torch.zeros_like(system.positions)
            self.init_state(system)

    def init_constants(self, system: System) -> None:
        """Time-step dependent constants (recomputed on every start)."""

    def init_state(self, system: System) -> None:
        """Internal dynamical state (created once; restored from checkpoints)."""

    def on_simulation_start(self, simulator) -> None:
        self.setup(simulator.system, simulator.integrator.time_step, simulator.generator)

    def accounted_half_step(self, system: System) -> None:
        p = system.momenta
        self.exchanged.addcmul_(p, p)
        self.half_step(system)
        p = system.momenta
        self.exchanged.addcmul_(p, p, value=-1.0)

    def on_step_begin(self, simulator) -> None:
        self.accounted_half_step(simulator.system)

    def on_step_end(self, simulator) -> None:
        self.accounted_half_step(simulator.system)

    @property
    def energy(self) -> torch.Tensor | None:
        """Energy taken out of the system so far, Hartree.  [R, M]"""
        if self.exchanged is None or self._system is None:
            return None
        s = self._system
        return s.sum_molecules(0.5 * self.exchanged.sum(-1) / s.masses.view(1, -1))

    def bath_energy(self):
        return self.energy

    # -- helpers ------------------------------------------------------------------------
    def normal(self, shape, system: System) -> torch.Tensor:
        """Standard normal numbers from the simulator's generator (drawn on CPU)."""
        x = torch.randn(shape, generator=self.generator, dtype=system.dtype)
        return x if system.device.type == "cpu" else x.to(system.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Subclass state to checkpoint (besides the bath energy)."""
        return {}

    def state_dict(self) -> dict:
        if self.exchanged is None:
            return {}
        return {"exchanged": self.exchanged.clone(), **{k: v.clone() for k, v in self.state_tensors().items()}}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = dict(state) if state else None

    def _restore(self, state: dict, system: System) -> None:
        dev, dt = system.device, system.dtype
        for k, v in state.items():
            setattr(self, k, v.to(device=dev, dtype=dt))

    def to(self, device=None, dtype=None):
        if self.exchanged is not None:
            self.exchanged = self.exchanged.to(device=device, dtype=dtype)
            for k, v in self.state_tensors().items():
                setattr(self, k, v.to(device=device, dtype=dtype))
        return self


class Berendsen(Thermostat):
    """Weak-coupling velocity rescaling: λ² = 1 + (Δt/τ)(T0/T - 1) per molecule and replica.

    Not canonical (suppresses fluctuations); reaches the target mean temperature.

    Args:
        temperature_K: target temperature.
        time_constant_fs: coupling time τ.
    """

    def __init__(self, temperature_K: float, time_constant_fs: float = 100.0) -> None:
        super().__init__(temperature_K)
        self.time_constant = _positive("time_constant_fs", time_constant_fs) * units.factor("fs", "au_time")

    def half_step(self, system: System) -> None:
        T = system.temperature()  # [R, M]
        lam2 = 1.0 + (self.half_dt / self.time_constant) * (self.temperature_K / T - 1.0)
        lam = torch.sqrt(torch.clamp(lam2, min=0.0))
        system.momenta *= system.expand_molecules(lam).unsqueeze(-1)


class Langevin(Thermostat):
    """Langevin thermostat, exact Ornstein–Uhlenbeck half-steps around velocity Verlet
    (Bussi & Parrinello 2007, "OBABO"): p ← c p + sqrt((1 - c²) m kT) ξ, c = exp(-γ Δt/2).

    Args:
        temperature_K: target temperature.
        time_constant_fs: 1/γ (friction time).
    """

    stochastic = True
    acts_per_atom = True

    def __init__(self, temperature_K: float, time_constant_fs: float = 100.0) -> None:
        super().__init__(temperature_K)
        self.time_constant = _positive("time_constant_fs", time_constant_fs) * units.factor("fs", "au_time")

    def init_constants(self, system: System) -> None:
        c = math.exp(-self.half_dt / self.time_constant)
        self.c = c
        self.sigma = torch.sqrt((1.0 - c * c) * self.kT * system.masses3)  # [1, N, 1]

    def half_step(self, system: System) -> None:
        noise = self.normal(system.momenta.shape, system)
        system.momenta.mul_(self.c).addcmul_(self.sigma, noise)


class StochasticVelocityRescaling(Thermostat):
    """Bussi–Donadio–Parrinello canonical velocity rescaling (one factor per molecule and replica).

    The new kinetic energy is drawn exactly from the stochastic differential equation
    dK = (K̄ - K) dt/τ + 2 sqrt(K K̄ / N_f) dW/sqrt(τ) over each half step.

    Args:
        temperature_K: target temperature.
        time_constant_fs: relaxation time τ.
    """

    stochastic = True

    def __init__(self, temperature_K: float, time_constant_fs: float = 100.0) -> None:
        super().__init__(temperature_K)
        self.time_constant = _positive("time_constant_fs", time_constant_fs) * units.factor("fs", "au_time")

    def init_constants(self, system: System) -> None:
        self.c = math.exp(-self.half_dt / self.time_constant)
        nf = system.dof.round().long()
        self.nf = system.dof.view(1, -1)  # [1, M]
        self.k_target = 0.5 * self.nf * self.kT  # [1, M]
        width = int(nf.max()) - 1
        self.mask = (torch.arange(max(width, 1), device=system.device).view(1, -1) < (nf - 1).view(-1, 1)).to(system.dtype)

    def half_step(self, system: System) -> None:
        K = system.kinetic_energy()  # [R, M]
        R, M = K.shape
        c, Kt, nf = self.c, self.k_target, self.nf
        r1 = self.normal((R, M), system)
        rest = self.normal((R, M, self.mask.shape[1]), system)
        s = (rest * rest * self.mask).sum(-1)
        K_new = c * K + (1.0 - c) * Kt * (r1 * r1 + s) / nf + 2.0 * r1 * torch.sqrt(c * (1.0 - c) * K * Kt / nf)
        alpha = torch.sqrt(K_new / K)
        sign = torch.sign(r1 + torch.sqrt(c * nf * K / ((1.0 - c) * Kt)))
        alpha = torch.where(K > 0, alpha * sign, torch.ones_like(alpha))
        system.momenta *= system.expand_molecules(alpha).unsqueeze(-1)


# Suzuki–Yoshida weights
_YOSHIDA = {
    1: (1.0,),
    3: (1.0 / (2.0 - 2.0 ** (1.0 / 3.0)), -(2.0 ** (1.0 / 3.0)) / (2.0 - 2.0 ** (1.0 / 3.0)), 1.0 / (2.0 - 2.0 ** (1.0 / 3.0))),
}
_w5 = 1.0 / (4.0 - 4.0 ** (1.0 / 3.0))
_YOSHIDA[5] = (_w5, _w5, 1.0 - 4.0 * _w5, _w5, _w5)


class NoseHooverChain(Thermostat):
    """Nosé–Hoover chains (Martyna–Tuckerman–Klein), Suzuki–Yoshida factorisation.

    Args:
        temperature_K: target temperature.
        time_constant_fs: period τ of the thermostat; Q1 = N_f kT τ², Q_k = kT τ².
        chain_length: number of chained thermostats.
        per_atom: one chain per Cartesian degree of freedom ("massive") instead of per molecule.
        n_yoshida: 1, 3 or 5 Suzuki–Yoshida weights.
        n_steps: multiple time steps per half step.

    Besides the KE-accounting bath energy, :meth:`extended_energy` gives the chain's own
    energy Σ ½ Q v² + N_f kT η₁ + kT Σ_{k>1} η_k, so KE + PE + extended energy is the
    Nosé–Hoover conserved quantity.
    """

    def __init__(
        self,
        temperature_K: float,
        time_constant_fs: float = 100.0,
        chain_length: int = 3,
        per_atom: bool = False,
        n_yoshida: int = 3,
        n_steps: int = 1,
    ) -> None:
        super().__init__(temperature_K)
        self.time_constant = _positive("time_constant_fs", time_constant_fs) * units.factor("fs", "au_time")
        if chain_length < 1:
            raise ThermostatError(f"chain_length must be at least 1, got {chain_length}")
        if n_yoshida not in _YOSHIDA:
            raise ThermostatError(f"n_yoshida must be one of {sorted(_YOSHIDA)}, got {n_yoshida}")
        if n_steps < 1:
            raise ThermostatError(f"n_steps must be at least 1, got {n_steps}")
        self.chain_length = int(chain_length)
        self.per_atom = bool(per_atom)
        self.acts_per_atom = self.per_atom
        self.n_yoshida = int(n_yoshida)
        self.n_steps = int(n_steps)

    def _group_shape(self, system: System) -> tuple[int, ...]:
        R = system.n_replicas
        return (R, system.n_atoms_total, 3) if self.per_atom else (R, system.n_molecules)

    def init_constants(self, system: System) -> None:
        tau2 = self.time_constant**2
        if self.per_atom:
            nf = torch.ones(1, 1, 1, dtype=system.dtype, device=system.device)
        else:
            nf = system.dof.view(1, -1)
        self.nf = nf
        L = self.chain_length
        q = torch.full((L,), self.kT * tau2, dtype=system.dtype, device=system.device)
        self.Q = [nf * q[0]] + [q[k] for k in range(1, L)]
        self.deltas = [w * self.half_dt / self.n_steps for w in _YOSHIDA[self.n_yoshida]] * self.n_steps

    def init_state(self, system: System) -> None:
        shape = self._group_shape(system) + (self.chain_length,)
        self.eta = torch.zeros(shape, dtype=system.dtype, device=system.device)
        self.v_eta = torch.zeros(shape, dtype=system.dtype, device=system.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"eta": self.eta, "v_eta": self.v_eta}

    def _twice_ke(self, system: System) -> torch.Tensor:
        if self.per_atom:
            return system.momenta**2 / system.masses3
        return 2.0 * system.kinetic_energy()

    def half_step(self, system: System) -> None:
        L, kT, Q = self.chain_length, self.kT, self.Q
        v = list(self.v_eta.unbind(-1))
        eta = list(self.eta.unbind(-1))
        ke2 = self._twice_ke(system)
        scale = torch.ones_like(ke2)
        for d in self.deltas:
            # chain velocities, from the end of the chain to the thermostat of the particles
            G_last = (Q[L - 2] * v[L - 2] ** 2 - kT) / Q[L - 1] if L > 1 else (ke2 - self.nf * kT) / Q[0]
            v[L - 1] = v[L - 1] + 0.5 * d * G_last
            for k in range(L - 2, -1, -1):
                G = (ke2 - self.nf * kT) / Q[0] if k == 0 else (Q[k - 1] * v[k - 1] ** 2 - kT) / Q[k]
                f = torch.exp(-0.25 * d * v[k + 1])
                v[k] = (v[k] * f + 0.5 * d * G) * f
            # particles
            s = torch.exp(-d * v[0])
            scale = scale * s
            ke2 = ke2 * s * s
            for k in range(L):
                eta[k] = eta[k] + d * v[k]
            # chain velocities, back up the chain
            for k in range(L - 1):
                G = (ke2 - self.nf * kT) / Q[0] if k == 0 else (Q[k - 1] * v[k - 1] ** 2 - kT) / Q[k]
                f = torch.exp(-0.25 * d * v[k + 1])
                v[k] = (v[k] * f + 0.5 * d * G) * f
            G_last = (Q[L - 2] * v[L - 2] ** 2 - kT) / Q[L - 1] if L > 1 else (ke2 - self.nf * kT) / Q[0]
            v[L - 1] = v[L - 1] + 0.5 * d * G_last
        self.v_eta = torch.stack(v, -1)
        self.eta = torch.stack(eta, -1)
        if self.per_atom:
            system.momenta *= scale
        else:
            system.momenta *= system.expand_molecules(scale).unsqueeze(-1)

    def extended_energy(self, system: System) -> torch.Tensor:
        """Chain energy per replica and molecule, Hartree.  [R, M]"""
        kin = sum(0.5 * self.Q[k] * self.v_eta[..., k] ** 2 for k in range(self.chain_length))
        pot = self.nf * self.kT * self.eta[..., 0] + self.kT * self.eta[..., 1:].sum(-1)
        e = kin + pot
        if self.per_atom:
            e = system.sum_molecules(e.sum(-1))
        return e


# ---------------------------------------------------------------------------------------- GLE
_UNIT_WORDS = {
    "picoseconds^-1": "1/ps", "ps^-1": "1/ps", "1/ps": "1/ps", "femtoseconds^-1": "1/fs", "fs^-1": "1/fs",
    "1/fs": "1/fs", "atomic time units^-1": "1/au_time", "1/au_time": "1/au_time",
    "k": "K", "kelvin": "K", "ev": "eV", "hartree": "Hartree",
    "cm^-1": None,
}


_SECTION_HEADER = re.compile(r"#+\s*([ACD])[\s_-]*MATRIX\b\s*:?\s*(?:\(([^)]*)\))?", re.IGNORECASE)


def _gle_unit(word: str, kind: str, where: str) -> str | None:
    """Unit string of a matrix-section header word (``au`` means the atomic unit of that matrix)."""
    w = word.strip().lower()
    if w in ("au", "a.u.", "atomic_unit", "atomic units"):
        return {"A": "1/au_time", "C": "Hartree", "D": "au"}[kind]
    if w not in _UNIT_WORDS:
        raise ThermostatError(f"{where}: unknown unit {word.strip()!r} for the {kind} matrix")
    return _UNIT_WORDS[w]


def read_matrix_sections(path: str | Path) -> dict[str, tuple[np.ndarray, str | None]]:
    """Read the A/C/D matrix sections of a GLE4MD/i-PI style text file.

    Sections start with a comment naming the matrix and optionally its unit,
    e.g. ``# A MATRIX: (picoseconds^-1)``; a file without headers is one A
    matrix. A section holds one n×n matrix or several stacked (k·n rows, one
    block per normal mode for PIGLET). Returns {name: (array [k, n, n], unit or None)}.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLE matrix file {str(path)!r} does not exist")
    sections: dict[str, list[list[float]]] = {}
    unit_of: dict[str, str | None] = {}
    current = "A"
    for lineno, line in enumerate(path.read_text().splitlines(), 1):
        s = line.strip()
        if not s:
            continue
        if s.startswith("#"):
            # a section header is a comment that *starts* with the matrix name, e.g.
            # "# A MATRIX: (picoseconds^-1)"; any other comment (one that merely mentions
            # "the C matrix" in prose) is skipped
            m = _SECTION_HEADER.match(s)
            if m:
                current = m.group(1).upper()
                unit_of[current] = _gle_unit(m.group(2), current, f"{path}:{lineno}") if m.group(2) else None
            continue
        try:
            sections.setdefault(current, []).append([float(x) for x in s.split()])
        except ValueError as err:
            raise ThermostatError(f"{path}:{lineno}: not a row of numbers: {s!r}") from err
    if "A" not in sections:
        raise ThermostatError(f"{path}: no A matrix found")
    out = {}
    for name, rows in sections.items():
        n = len(rows[0])
        if any(len(r) != n for r in rows) or len(rows) % n:
            raise ThermostatError(
                f"{path}: the {name} matrix is not square ({len(rows)} rows of lengths {sorted({len(r) for r in rows})})"
            )
        out[name] = (np.array(rows, dtype=np.float64).reshape(-1, n, n), unit_of.get(name))
    return out


def read_gle_matrices(path: str | Path, A_unit: str | None = None, C_unit: str | None = None) -> tuple[np.ndarray, np.ndarray | None]:  # noqa: E501
    """Read drift (A) and optional C matrices (one of each) from a GLE4MD/i-PI style file.

    Returns A in 1/au_time and C in Hartree (``None`` if absent). ``A_unit``/``C_unit``
    override the units of the file (default 1/au_time and K). A ``# D MATRIX``
    section (diffusion, atomic units) is turned into C by solving the Lyapunov
    equation A C + C Aᵀ = D. See :func:`read_matrix_sections` for the layout.
    """
    sections = read_matrix_sections(path)
    for name, (m, _) in sections.items():
        if m.shape[0] != 1:
            raise ThermostatError(f"{path}: the {name} section holds {m.shape[0]} stacked matrices; one is expected here")
    mats = {name: m[0] for name, (m, _) in sections.items()}
    unit_of = {name: u for name, (_, u) in sections.items()}
    a_unit = A_unit or unit_of.get("A") or "1/au_time"
    A = mats["A"] * units.factor(a_unit, "1/au_time")
    C = None
    if "C" in mats:
        c_unit = C_unit or unit_of.get("C") or "K"
        C = mats["C"] * (units.KB_HARTREE_PER_K if c_unit == "K" else units.factor(c_unit, "Hartree"))
    elif "D" in mats:
        import scipy.linalg

        D = mats["D"]
        if unit_of.get("D") not in (None, "au"):
            raise ThermostatError(f"{path}: give the D matrix in atomic units (Hartree/au_time)")
        if D.shape != A.shape:
            raise ThermostatError(f"{path}: D has shape {D.shape}, A has {A.shape}")
        C = scipy.linalg.solve_continuous_lyapunov(A, D)
    return A, C


def _expm(a: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eig(a)
    return np.real(v @ np.diag(np.exp(w)) @ np.linalg.inv(v))


class GLE(Thermostat):
    """Generalized Langevin equation thermostat (Ceriotti et al.) with n auxiliary momenta.

    The extended momenta s = (p/√m, aux...) [R, N, 3, n+1] follow ds = -A s dt + B dW with
    B Bᵀ = D = A C + C Aᵀ; each half step applies the exact propagator
    s ← T s + S ξ, T = exp(-A Δt/2), S Sᵀ = C - T C Tᵀ.

    Args:
        temperature_K: sets C = kT·1 when no C (or D) is given (canonical sampling).
        A: drift matrix [(n+1), (n+1)] in 1/au_time, or
        A_file: GLE4MD/i-PI text file (see :func:`read_gle_matrices`).
        C: covariance in Hartree; D: diffusion matrix in Hartree/au_time (C is then solved from
           the Lyapunov equation A C + C Aᵀ = D).
    """

    stochastic = True
    acts_per_atom = True

    def __init__(
        self,
        temperature_K: float,
        A: np.ndarray | None = None,
        A_file: str | Path | None = None,
        C: np.ndarray | None = None,
        D: np.ndarray | None = None,
        A_unit: str | None = None,
        C_unit: str | None = None,
    ) -> None:
        super().__init__(temperature_K)
        if (A is None) == (A_file is None):
            raise ThermostatError("give exactly one of A (matrix) or A_file (GLE4MD text file)")
        if A_file is not None:
            A, C_file = read_gle_matrices(A_file, A_unit, C_unit)
            C = C if C is not None else C_file
        A = np.atleast_2d(np.asarray(A, dtype=np.float64))
        n = A.shape[0]
        if A.shape != (n, n):
            raise ThermostatError(f"A must be square, got shape {A.shape}")
        if C is not None and D is not None:
            raise ThermostatError("give C or D, not both")
        if D is not None:
            import scipy.linalg

            D = np.atleast_2d(np.asarray(D, dtype=np.float64))
            C = scipy.linalg.solve_continuous_lyapunov(A, D)
        if C is None:
            C = np.eye(n) * self.kT
        C = np.atleast_2d(np.asarray(C, dtype=np.float64))
        if C.shape != (n, n):
            raise ThermostatError(f"C must have the shape of A {A.shape}, got {C.shape}")
        if np.any(np.real(np.linalg.eigvals(A)) <= 0):
            raise ThermostatError(
                f"the GLE drift matrix A must have eigenvalues with positive real parts (got {np.linalg.eigvals(A)}); "
                "check the file and its unit"
            )
        if np.min(np.linalg.eigvalsh(0.5 * (C + C.T))) <= 0:
            raise ThermostatError("the GLE covariance matrix C must be symmetric positive-definite")
        Dm = A @ C + C @ A.T
        if np.min(np.linalg.eigvalsh(0.5 * (Dm + Dm.T))) < -1e-10 * np.abs(Dm).max():
            raise ThermostatError(
                "the GLE diffusion matrix D = A C + C Aᵀ is not positive semi-definite; these A and C "
                "do not describe a valid GLE"
            )
        self.A = A
        self.C = C
        self.n_s = n

    def init_constants(self, system: System) -> None:
        T = _expm(-self.A * self.half_dt)
        SS = self.C - T @ self.C @ T.T
        SS = 0.5 * (SS + SS.T)
        w, v = np.linalg.eigh(SS)
        S = v @ np.diag(np.sqrt(np.clip(w, 0.0, None)))  # S Sᵀ = SS (PSD square root)
        kw = dict(dtype=system.dtype, device=system.device)
        self.T_t = torch.as_tensor(T.T, **kw)
        self.S_t = torch.as_tensor(S.T, **kw)
        self.sqrt_m = torch.sqrt(system.masses3)  # [1, N, 1]

    def init_state(self, system: System) -> None:
        shape = tuple(system.momenta.shape) + (self.n_s - 1,)
        chol = np.linalg.cholesky(self.C)
        aux = self.normal(tuple(system.momenta.shape) + (self.n_s,), system) @ torch.as_tensor(
            chol.T, dtype=system.dtype, device=system.device
        )
        self.aux = aux[..., 1:].contiguous() if self.n_s > 1 else torch.zeros(shape, dtype=system.dtype, device=system.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"aux": self.aux}

    def half_step(self, system: System) -> None:
        s = torch.cat([(system.momenta / self.sqrt_m).unsqueeze(-1), self.aux], -1)  # [R, N, 3, n+1]
        noise = self.normal(s.shape, system)
        s = s @ self.T_t + noise @ self.S_t
        system.momenta.copy_(s[..., 0] * self.sqrt_m)
        self.aux = s[..., 1:].contiguous()


THERMOSTATS = {
    "berendsen": Berendsen,
    "langevin": Langevin,
    "svr": StochasticVelocityRescaling,
    "bussi": StochasticVelocityRescaling,
    "nhc": NoseHooverChain,
    "nose_hoover_chain": NoseHooverChain,
    "gle": GLE,
}
