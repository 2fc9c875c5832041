"""Barostats: the cell as a dynamical variable, for classical and ring-polymer NPT.

A barostat is a :class:`~spkmd.hooks.base.Hook` (its half-steps wrap the
integrator at ``on_step_begin`` / ``on_step_end``) *and* supplies the drift of an
NPT integrator (:mod:`spkmd.npt`): positions and cell move together in
:meth:`Barostat.drift`. Pass the same object to the integrator and to the hooks.

Ring polymers (P beads = replicas): the volume scales the *centroid* only; the
internal normal modes are propagated freely (Bussi–Zykova–Parrinello as in
i-PI), so the pressure is the centroid-virial estimator
:func:`spkmd.rpmd.estimators.pressure_tensor_instantaneous`. With one bead this is
ordinary classical NPT. The barostat works at the physical temperature T on the
centroid; each replica's conserved-quantity share is the barostat energy, so
Σ_beads (KE + PE + springs) + Σ_beads bath = H_P + P·E_baro is conserved.

Every molecule of the system has its own cell and barostat (several boxes run in one batch).

Available:

* :class:`MTKIsotropic`  — Martyna–Tuckerman–Tobias–Klein, ε = ln(V/V₀)/3, Nosé–Hoover chain on the barostat.
* :class:`MTKAnisotropic` — MTK with a symmetric 3×3 cell velocity (full flexible cell), NHC per component.
* :class:`PILEBarostat`  — BZP isotropic barostat with a Langevin thermostat on the cell momentum (for ring polymers, as i-PI).
* :class:`StochasticCellRescaling` — Bernetti & Bussi, J. Chem. Phys. 153, 114107 (2020), isotropic.

Thermostat the particles with a separate thermostat hook (Langevin/NHC, or PILE for ring polymers).
"""

from __future__ import annotations

import math

import torch

from spkserve import units
from spkmd.hooks.base import Hook
from spkmd.rpmd.estimators import pressure_tensor_instantaneous
from spkmd.rpmd.normal_modes import FreeRingPolymerPropagator, from_normal_modes, to_normal_modes
from spkmd.system import System


class BarostatError(ValueError):
    """Bad barostat setup (non-periodic system, no stress, bad parameters)."""


def _positive(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
        raise BarostatError(f"{name} must be a positive number, got {value!r}")
    return float(value)


def _sinhc(x: torch.Tensor) -> torch.Tensor:
    """sinh(x)/x, accurate near 0."""
    small = x.abs() < 1e-4
    xs = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 + x * x / 6.0, torch.sinh(xs) / xs)


def _expm1_over_x(x: torch.Tensor) -> torch.Tensor:
    """(eˣ − 1)/x, accurate near 0."""
    small = x.abs() < 1e-6
    xs = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1.0 + 0.5 * x, torch.expm1(xs) / xs)


class Barostat(Hook):
    """Base class.

    Args:
        pressure_bar: target pressure.
        temperature_K: physical temperature (of the centroid / the atoms).
        time_constant_fs: barostat period τ_p.
    """

    #: the barostat moves the cell only in :meth:`drift` (no half-steps)
    half_steps = True

    def __init__(self, pressure_bar: float, temperature_K: float, time_constant_fs: float = 500.0) -> None:
        if not (isinstance(pressure_bar, (int, float)) and math.isfinite(pressure_bar)):
            raise BarostatError(f"pressure_bar must be a finite number, got {pressure_bar!r}")
        self.pressure_bar = float(pressure_bar)
        self.pressure = self.pressure_bar * units.factor("bar", "Hartree/Bohr^3")
        self.temperature_K = _positive("temperature_K", temperature_K)
        self.kT = self.temperature_K * units.KB_HARTREE_PER_K
        self.time_constant = _positive("time_constant_fs", time_constant_fs) * units.factor("fs", "au_time")
        self.generator: torch.Generator | None = None
        self.half_dt: float | None = None
        self.ready = False
        self._loaded: dict | None = None
        self.exchanged: torch.Tensor | None = None  # [M] energy given to thermostats/noise, Hartree

    # -------------------------------------------------------------------- checks, setup
    def check(self, system: System) -> None:
        """Raise :class:`BarostatError` if a molecule is not periodic in all directions."""
        bad = (~system.pbc.all(-1)).nonzero().flatten().tolist()
        if bad:
            raise BarostatError(
                f"a barostat needs fully periodic systems, but molecules {bad[:10]} have pbc "
                f"{system.pbc[bad[0]].tolist()}; use NVT/NVE for molecules or clusters, or give them a periodic cell"
            )
        if system.stress is None:
            raise BarostatError(
                "the calculator gave no stress; NPT needs it (use a model with stress output and calculator stress=true)"
            )

    def setup(self, system: System, time_step: float, generator: torch.Generator | None = None) -> None:
        self.check(system)
        self.half_dt = 0.5 * float(time_step)
        self.time_step = float(time_step)
        if generator is not None:
            self.generator = generator
        elif self.generator is None:
            self.generator = torch.Generator().manual_seed(0)
        kw = dict(dtype=system.dtype, device=system.device)
        self.n_dof = (3 * system.n_atoms).to(system.dtype)  # centroid degrees of freedom per molecule [M]
        self.init_constants(system)
        if self._loaded is not None:
            for k, v in self._loaded.items():
                setattr(self, k, v.to(**kw))
            self._loaded = None
        elif self.exchanged is None or self.exchanged.shape != (system.n_molecules,):
            self.exchanged = torch.zeros(system.n_molecules, **kw)
            self.init_state(system)
        self.ready = True

    def init_constants(self, system: System) -> None:
        """Masses and propagator constants (need ``self.half_dt``)."""

    def init_state(self, system: System) -> None:
        """Cell momenta etc."""

    def on_simulation_start(self, simulator) -> None:
        integ = simulator.integrator
        if not hasattr(integ, "barostat"):
            raise BarostatError(
                f"a barostat needs an NPT integrator, the simulator has {type(integ).__name__}; "
                "use spkmd.npt.NPTVelocityVerlet / RingPolymerNPT (CLI: dynamics/integrator=npt or rpmd_npt)"
            )
        if integ.barostat is None:
            from spkmd.npt import check_temperatures

            check_temperatures(integ, self)
            integ.barostat = self
        elif integ.barostat is not self:
            raise BarostatError("the NPT integrator holds a different barostat than the one in the hooks; pass the same object")
        self.setup(simulator.system, integ.time_step, simulator.generator)
        self._system = simulator.system

    # -------------------------------------------------------------------- the step
    def half_step(self, system: System) -> None:
        """Cell momentum and centroid-momentum update over ``half_dt`` (first half of the step)."""

    def half_step_end(self, system: System) -> None:
        """Mirror of :meth:`half_step` after the second kick."""

    def on_step_begin(self, simulator) -> None:
        self.half_step(simulator.system)

    def on_step_end(self, simulator) -> None:
        self.half_step_end(simulator.system)

    def drift_centroid(self, system: System, q: torch.Tensor, p: torch.Tensor, cells: torch.Tensor, dt: float):
        """New centroid positions [N, 3], momenta [N, 3] and cells [M, 3, 3] after dt."""
        raise NotImplementedError

    def drift(self, system: System, dt: float, propagator: FreeRingPolymerPropagator | None = None) -> None:
        """NPT drift: internal ring-polymer modes freely, centroid and cell by the barostat (in place)."""
        if not self.ready:
            raise BarostatError(
                f"{type(self).__name__} was not set up: pass the same barostat object to the NPT integrator "
                "AND to the simulator's hooks"
            )
        P = system.n_replicas
        cells = system.cells[0]
        if P == 1:
            q, p, c = self.drift_centroid(system, system.positions[0], system.momenta[0], cells, dt)
            system.positions[0] = q
            system.momenta[0] = p
        else:
            C = propagator.C
            q_nm = to_normal_modes(system.positions, C)
            p_nm = to_normal_modes(system.momenta, C)
            q_nm, p_nm = propagator.propagate_modes(q_nm, p_nm, system.masses3, first_mode=1)
            sp = math.sqrt(P)
            q, p, c = self.drift_centroid(system, q_nm[0] / sp, p_nm[0] / sp, cells, dt)
            q_nm[0] = q * sp
            p_nm[0] = p * sp
            system.positions.copy_(from_normal_modes(q_nm, C))
            system.momenta.copy_(from_normal_modes(p_nm, C))
        system.cells = c.unsqueeze(0).expand(P, -1, -1, -1).contiguous()

    # -------------------------------------------------------------------- helpers
    def pressure_tensor(self, system: System) -> torch.Tensor:
        """Instantaneous (centroid-virial) pressure tensor, Hartree/Bohr³.  [M, 3, 3]"""
        return pressure_tensor_instantaneous(system)

    def centroid_twice_ke(self, system: System) -> torch.Tensor:
        """Σ m v̄² per molecule (centroid), Hartree.  [M]"""
        p = system.momenta.mean(0)
        return system.sum_molecules((p * p / system.masses.view(-1, 1)).sum(-1).unsqueeze(0))[0]

    def scale_centroid_momenta(self, system: System, factor: torch.Tensor) -> None:
        """p̄ ← factor · p̄ per molecule (factor [M] or [M, 3, 3] acting on vectors), beads shifted alike."""
        p_c = system.momenta.mean(0)  # [N, 3]
        f = factor[system.molecule_index]
        if factor.dim() == 1:
            new = p_c * f.view(-1, 1)
        else:
            new = (f @ p_c.unsqueeze(-1)).squeeze(-1)
        system.momenta += (new - p_c).unsqueeze(0)

    def volume(self, system: System) -> torch.Tensor:
        return torch.abs(torch.linalg.det(system.cells[0]))  # [M]

    def normal(self, shape, system: System) -> torch.Tensor:
        x = torch.randn(shape, generator=self.generator, dtype=system.dtype)
        return x if system.device.type == "cpu" else x.to(system.device)

    def extended_energy(self, system: System) -> torch.Tensor:
        """Barostat energy per molecule (cell kinetic energy, P_ext V, thermostat terms), Hartree.  [M]"""
        return self.pressure * self.volume(system)

    def bath_energy(self):
        """Barostat share of the conserved quantity per replica: extended energy + exchanged.  [R, M]"""
        system = getattr(self, "_system", None)
        if system is None or not self.ready:
            return None
        e = self.extended_energy(system) + self.exchanged  # [M]
        return e.unsqueeze(0).expand(system.n_replicas, -1)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {}

    def state_dict(self) -> dict:
        if self.exchanged is None:
            return {}
        return {"exchanged": self.exchanged.clone(), **{k: v.clone() for k, v in self.state_tensors().items()}}

    def load_state_dict(self, state: dict) -> None:
        self._loaded = dict(state) if state else None

    def to(self, device=None, dtype=None) -> "Barostat":
        if self.exchanged is not None:
            self.exchanged = self.exchanged.to(device=device, dtype=dtype)
            for k, v in self.state_tensors().items():
                setattr(self, k, v.to(device=device, dtype=dtype))
        return self


# ------------------------------------------------------------------------- NHC on cell momenta
class _CellNHC:
    """Nosé–Hoover chains acting on barostat momenta (one chain per component), Q = kT τ²."""

    def __init__(self, kT: float, tau: float, chain_length: int, shape, dtype, device) -> None:
        self.kT, self.L = kT, chain_length
        self.Q = kT * tau * tau
        self.v = torch.zeros(tuple(shape) + (chain_length,), dtype=dtype, device=device)
        self.eta = torch.zeros_like(self.v)

    def half_step(self, p: torch.Tensor, W: float | torch.Tensor, h: float, n_sub: int = 4) -> torch.Tensor:
        """Return p scaled by the chain over time h (in place on the chain state)."""
        kT, Q, L = self.kT, self.Q, self.L
        d = h / n_sub
        scale = torch.ones_like(p)
        for _ in range(n_sub):
            ke2 = (p * scale) ** 2 / W
            v = list(self.v.unbind(-1))
            # backward sweep
            for k in range(L - 1, -1, -1):
                G = (ke2 - kT) / Q if k == 0 else (Q * v[k - 1] ** 2 - kT) / Q
                if k < L - 1:
                    f = torch.exp(-0.25 * d * v[k + 1])
                    v[k] = (v[k] * f + 0.5 * d * G) * f
                else:
                    v[k] = v[k] + 0.5 * d * G
            s = torch.exp(-d * v[0])
            scale = scale * s
            ke2 = ke2 * s * s
            self.eta = self.eta + d * torch.stack(v, -1)
            for k in range(L):
                G = (ke2 - kT) / Q if k == 0 else (Q * v[k - 1] ** 2 - kT) / Q
                if k < L - 1:
                    f = torch.exp(-0.25 * d * v[k + 1])
                    v[k] = (v[k] * f + 0.5 * d * G) * f
                else:
                    v[k] = v[k] + 0.5 * d * G
            self.v = torch.stack(v, -1)
        return p * scale

    def energy(self) -> torch.Tensor:
        """Σ ½ Q v² + kT Σ η per chain (summed over the chain axis)."""
        return (0.5 * self.Q * self.v**2 + self.kT * self.eta).sum(-1)


class MTKIsotropic(Barostat):
    """Isotropic MTK barostat with a Nosé–Hoover chain on the cell momentum.

    ε = ln(V/V₀)/3, W = (N_f + 3) k_BT τ_p²/(2π)²·(2π)² = (N_f + 3) k_BT τ_p², and::

        dp_ε/dt = 3V (P_inst − P_ext) + (3/N_f) Σ m v̄²
        dp̄/dt  = F̄ − (1 + 3/N_f) (p_ε/W) p̄,   dq̄/dt = p̄/m + (p_ε/W) q̄,   dV/dt = 3V p_ε/W

    Conserved: H + p_ε²/2W + P_ext V + chain energy.

    Args:
        pressure_bar, temperature_K, time_constant_fs: target pressure, T, barostat period τ_p.
        thermostat_time_constant_fs: period of the chain on the cell momentum.
        chain_length: length of that chain.
    """

    def __init__(self, pressure_bar: float, temperature_K: float, time_constant_fs: float = 500.0,
                 thermostat_time_constant_fs: float = 100.0, chain_length: int = 3) -> None:
        super().__init__(pressure_bar, temperature_K, time_constant_fs)
        self.thermostat_time_constant = _positive("thermostat_time_constant_fs", thermostat_time_constant_fs) * units.factor("fs", "au_time")
        if chain_length < 1:
            raise BarostatError(f"chain_length must be at least 1, got {chain_length}")
        self.chain_length = int(chain_length)

    def init_constants(self, system: System) -> None:
        self.W = (self.n_dof + 3.0) * self.kT * self.time_constant**2  # [M]
        self.alpha = 1.0 + 3.0 / self.n_dof

    def init_state(self, system: System) -> None:
        self.p_eps = torch.zeros(system.n_molecules, dtype=system.dtype, device=system.device)
        self.chain = _CellNHC(self.kT, self.thermostat_time_constant, self.chain_length, (system.n_molecules,),
                              system.dtype, system.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"p_eps": self.p_eps}

    def force(self, system: System) -> torch.Tensor:
        press = torch.diagonal(self.pressure_tensor(system), dim1=-2, dim2=-1).sum(-1) / 3.0
        return 3.0 * self.volume(system) * (press - self.pressure) + (3.0 / self.n_dof) * self.centroid_twice_ke(system)

    def half_step(self, system: System) -> None:
        self.p_eps = self.chain.half_step(self.p_eps, self.W, self.half_dt)
        self.p_eps = self.p_eps + self.half_dt * self.force(system)
        self.scale_centroid_momenta(system, torch.exp(-self.alpha * self.p_eps / self.W * self.half_dt))

    def half_step_end(self, system: System) -> None:
        self.scale_centroid_momenta(system, torch.exp(-self.alpha * self.p_eps / self.W * self.half_dt))
        self.p_eps = self.p_eps + self.half_dt * self.force(system)
        self.p_eps = self.chain.half_step(self.p_eps, self.W, self.half_dt)

    def drift_centroid(self, system, q, p, cells, dt):
        v = self.p_eps / self.W  # [M]
        x = v * dt
        va = v[system.molecule_index].view(-1, 1)
        xa = va * dt
        q_new = q * torch.exp(xa) + dt * (p / system.masses.view(-1, 1)) * torch.exp(0.5 * xa) * _sinhc(0.5 * xa)
        return q_new, p, cells * torch.exp(x).view(-1, 1, 1)

    def extended_energy(self, system: System) -> torch.Tensor:
        return 0.5 * self.p_eps**2 / self.W + self.pressure * self.volume(system) + self.chain.energy()


class PILEBarostat(MTKIsotropic):
    """Bussi–Zykova–Parrinello isotropic barostat with a Langevin (PILE-style) thermostat on the
    cell momentum, the ring-polymer barostat of i-PI::

        dp_ε/dt = 3V (P_inst − P_ext) + 3 k_BT − γ p_ε + noise,   dp̄/dt = F̄ − (p_ε/W) p̄

    W = 3 N k_BT τ_p²/(2π)²; friction γ = 1/τ_thermostat. Conserved: H + p_ε²/2W + P_ext V − k_BT ln V + bath.

    Args:
        pressure_bar, temperature_K, time_constant_fs: target pressure, T, barostat period τ_p.
        thermostat_time_constant_fs: 1/γ of the Langevin thermostat on the cell momentum.
    """

    def __init__(self, pressure_bar: float, temperature_K: float, time_constant_fs: float = 500.0,
                 thermostat_time_constant_fs: float = 100.0) -> None:
        Barostat.__init__(self, pressure_bar, temperature_K, time_constant_fs)
        self.thermostat_time_constant = _positive("thermostat_time_constant_fs", thermostat_time_constant_fs) * units.factor("fs", "au_time")

    def init_constants(self, system: System) -> None:
        self.W = 3.0 * system.n_atoms.to(system.dtype) * self.kT * (self.time_constant / (2.0 * math.pi)) ** 2
        self.alpha = torch.ones_like(self.W)
        self.c = math.exp(-self.half_dt / self.thermostat_time_constant)

    def init_state(self, system: System) -> None:
        self.p_eps = torch.zeros(system.n_molecules, dtype=system.dtype, device=system.device)

    def force(self, system: System) -> torch.Tensor:
        press = torch.diagonal(self.pressure_tensor(system), dim1=-2, dim2=-1).sum(-1) / 3.0
        return 3.0 * self.volume(system) * (press - self.pressure) + 3.0 * self.kT

    def _langevin(self, system: System) -> None:
        e0 = 0.5 * self.p_eps**2 / self.W
        noise = self.normal(self.p_eps.shape, system)
        self.p_eps = self.c * self.p_eps + torch.sqrt((1.0 - self.c**2) * self.W * self.kT) * noise
        self.exchanged = self.exchanged + e0 - 0.5 * self.p_eps**2 / self.W

    def half_step(self, system: System) -> None:
        self._langevin(system)
        self.p_eps = self.p_eps + self.half_dt * self.force(system)
        self.scale_centroid_momenta(system, torch.exp(-self.p_eps / self.W * self.half_dt))

    def half_step_end(self, system: System) -> None:
        self.scale_centroid_momenta(system, torch.exp(-self.p_eps / self.W * self.half_dt))
        self.p_eps = self.p_eps + self.half_dt * self.force(system)
        self._langevin(system)

    def extended_energy(self, system: System) -> torch.Tensor:
        V = self.volume(system)
        return 0.5 * self.p_eps**2 / self.W + self.pressure * V - self.kT * torch.log(V)


def _sym_eig(m: torch.Tensor):
    w, U = torch.linalg.eigh(0.5 * (m + m.transpose(-1, -2)))
    return w, U


class MTKAnisotropic(Barostat):
    """Fully flexible MTK barostat: symmetric cell velocity v_g = p_g/W (no cell rotation)::

        dp_g/dt = V (Π − P_ext 1) + (1/N_f) Σ m v̄² 1
        dp̄/dt  = F̄ − (v_g + tr(v_g)/N_f) p̄,   dq̄/dt = p̄/m + v_g q̄,   dh/dt = v_g h

    W = (N_f + 3) k_BT τ_p²/3; a Nosé–Hoover chain on each of the 9 components of p_g.
    Conserved: H + tr(p_g p_gᵀ)/2W + P_ext V + chain energy.

    Args:
        pressure_bar, temperature_K, time_constant_fs: hydrostatic target pressure, T, τ_p.
        thermostat_time_constant_fs, chain_length: the chains on p_g.
    """

    def __init__(self, pressure_bar: float, temperature_K: float, time_constant_fs: float = 500.0,
                 thermostat_time_constant_fs: float = 100.0, chain_length: int = 3) -> None:
        super().__init__(pressure_bar, temperature_K, time_constant_fs)
        self.thermostat_time_constant = _positive("thermostat_time_constant_fs", thermostat_time_constant_fs) * units.factor("fs", "au_time")
        if chain_length < 1:
            raise BarostatError(f"chain_length must be at least 1, got {chain_length}")
        self.chain_length = int(chain_length)

    def init_constants(self, system: System) -> None:
        self.W = ((self.n_dof + 3.0) * self.kT * self.time_constant**2 / 3.0).view(-1, 1, 1)  # [M, 1, 1]
        self.eye = torch.eye(3, dtype=system.dtype, device=system.device)

    def init_state(self, system: System) -> None:
        self.p_g = torch.zeros(system.n_molecules, 3, 3, dtype=system.dtype, device=system.device)
        self.chain = _CellNHC(self.kT, self.thermostat_time_constant, self.chain_length, (system.n_molecules, 3, 3),
                              system.dtype, system.device)

    def state_tensors(self) -> dict[str, torch.Tensor]:
        return {"p_g": self.p_g}

    def force(self, system: System) -> torch.Tensor:
        V = self.volume(system).view(-1, 1, 1)
        Pi = self.pressure_tensor(system)
        Pi = 0.5 * (Pi + Pi.transpose(-1, -2))
        k = (self.centroid_twice_ke(system) / self.n_dof).view(-1, 1, 1)
        return V * (Pi - self.pressure * self.eye) + k * self.eye

    def _scale(self, system: System) -> None:
        v = self.p_g / self.W
        tr = torch.diagonal(v, dim1=-2, dim2=-1).sum(-1) / self.n_dof  # [M]
        w, U = _sym_eig(v)
        f = torch.exp(-(w + tr.view(-1, 1)) * self.half_dt)
        self.scale_centroid_momenta(system, U @ torch.diag_embed(f) @ U.transpose(-1, -2))

    def half_step(self, system: System) -> None:
        self.p_g = self.chain.half_step(self.p_g, self.W, self.half_dt)
        self.p_g = self.p_g + self.half_dt * self.force(system)
        self._scale(system)

    def half_step_end(self, system: System) -> None:
        self._scale(system)
        self.p_g = self.p_g + self.half_dt * self.force(system)
        self.p_g = self.chain.half_step(self.p_g, self.W, self.half_dt)

    def drift_centroid(self, system, q, p, cells, dt):
        w, U = _sym_eig(self.p_g / self.W)  # [M, 3], [M, 3, 3]
        E = U @ torch.diag_embed(torch.exp(w * dt)) @ U.transpose(-1, -2)
        G = U @ torch.diag_embed(dt * _expm1_over_x(w * dt)) @ U.transpose(-1, -2)
        Ea, Ga = E[system.molecule_index], G[system.molecule_index]
        v = p / system.masses.view(-1, 1)
        q_new = (Ea @ q.unsqueeze(-1) + Ga @ v.unsqueeze(-1)).squeeze(-1)
        cells_new = cells @ E.transpose(-1, -2)  # rows are lattice vectors: a' = E a
        return q_new, p, cells_new

    def extended_energy(self, system: System) -> torch.Tensor:
        return ((self.p_g**2).sum((-1, -2)) / (2.0 * self.W.view(-1)) + self.pressure * self.volume(system)
                + self.chain.energy().sum((-1, -2)))


class StochasticCellRescaling(Barostat):
    """Bernetti–Bussi stochastic cell rescaling (isotropic), one update per step in the drift.

    The volume moves by overdamped Langevin dynamics in λ = √V, where the noise is additive::

        dλ = (D/k_BT) f dt + √(2D dt) ξ,   D = k_BT β_T/(4τ_p),
        f  = −2λ (P_ext − P_inst − k_BT/(2V))

    (P_inst with the centroid kinetic energy), which samples p(V) ∝ exp(−(H + P_ext V)/k_BT)
    with momenta scaled as 1/s. The step is the time-reversible, volume-preserving
    "Trotter" form of Bernetti & Bussi: with s = (λ'/λ)^{2/3}::

        q' = s q + ½(s + 1/s) (p/m) dt,   p' = p/s,   h' = s h

    Effective energy (the conserved quantity): H + P_ext V + Σ_steps w, where
    w = ½ Δλ (f + f') − ¼ (D/k_BT) dt (f² − f'²) + k_BT ln(λ/λ') is the log-ratio of the
    backward and forward step probabilities (times k_BT), with f before and f' after
    the step (f' needs the new forces, so it is added at the end of the step). Its drift
    vanishes as dt → 0, it is zero on average for an exact integrator.

    Args:
        pressure_bar, temperature_K: targets.
        time_constant_fs: τ_p.
        compressibility_per_bar: β_T (an estimate; only the relaxation speed depends on it).
    """

    half_steps = False

    def __init__(self, pressure_bar: float, temperature_K: float, time_constant_fs: float = 500.0,
                 compressibility_per_bar: float = 4.5e-5) -> None:
        super().__init__(pressure_bar, temperature_K, time_constant_fs)
        self.compressibility = _positive("compressibility_per_bar", compressibility_per_bar) * units.factor("1/bar", "Bohr^3/Hartree")
        self.diffusion = self.kT * self.compressibility / (4.0 * self.time_constant)  # D of λ = √V, Bohr³/au_time
        self._pending: tuple[torch.Tensor, torch.Tensor] | None = None  # (Δλ, Σ m v̄² after the drift)

    def _force(self, lam: torch.Tensor, press: torch.Tensor) -> torch.Tensor:
        """f = −2λ (P_ext − P_inst − k_BT/(2V)) per molecule.  [M]"""
        return -2.0 * lam * (self.pressure - press - 0.5 * self.kT / (lam * lam))

    def _work(self, d_lam: torch.Tensor, f: torch.Tensor, sign: float) -> torch.Tensor:
        """Half of w: ½ Δλ f ∓ ¼ (D/k_BT) dt f² (``sign`` −1 before, +1 after the step)."""
        return 0.5 * d_lam * f + sign * 0.25 * (self.diffusion / self.kT) * self.time_step * f * f

    def drift_centroid(self, system, q, p, cells, dt):
        V = self.volume(system)  # [M]
        lam = torch.sqrt(V)
        press = torch.diagonal(self.pressure_tensor(system), dim1=-2, dim2=-1).sum(-1) / 3.0
        f = self._force(lam, press)
        noise = self.normal(V.shape, system)
        d_lam = (self.diffusion / self.kT) * f * dt + math.sqrt(2.0 * self.diffusion * dt) * noise
        new_lam = lam + d_lam
        if not bool((new_lam > 0).all()):
            bad = (new_lam <= 0).nonzero().flatten().tolist()
            raise BarostatError(
                f"stochastic cell rescaling collapsed the cell of molecules {bad[:10]} in one step; "
                "use a larger time_constant_fs or a smaller compressibility_per_bar"
            )
        s = (new_lam / lam) ** (2.0 / 3.0)  # linear scale factor, s³ = V'/V  [M]
        sa = s[system.molecule_index].view(-1, 1)
        m = system.masses.view(-1, 1)
        q_new = sa * q + 0.5 * (sa + 1.0 / sa) * (p / m) * dt
        p_new = p / sa
        self.exchanged = self.exchanged + self._work(d_lam, f, -1.0) + self.kT * torch.log(lam)
        twice_k_after = system.sum_molecules((p_new * p_new / m).sum(-1).unsqueeze(0))[0]
        self._pending = (d_lam, twice_k_after)
        return q_new, p_new, cells * s.view(-1, 1, 1)

    def half_step_end(self, system: System) -> None:
        """Second half of the step's work term, with the forces at the new cell."""
        if self._pending is None:
            return
        d_lam, twice_k_after = self._pending
        self._pending = None
        V = self.volume(system)
        lam = torch.sqrt(V)
        press_now = torch.diagonal(self.pressure_tensor(system), dim1=-2, dim2=-1).sum(-1) / 3.0
        # the pressure right after the drift: virial at the new positions, kinetic part before the kick
        press = press_now + (twice_k_after - self.centroid_twice_ke(system)) / (3.0 * V)
        f = self._force(lam, press)
        self.exchanged = self.exchanged + self._work(d_lam, f, 1.0) - self.kT * torch.log(lam)

    def extended_energy(self, system: System) -> torch.Tensor:
        return self.pressure * self.volume(system)


BAROSTATS = {
    "mtk": MTKIsotropic,
    "nhc_isotropic": MTKIsotropic,
    "nhc_anisotropic": MTKAnisotropic,
    "mtk_anisotropic": MTKAnisotropic,
    "pile": PILEBarostat,
    "pile_barostat": PILEBarostat,
    "scr": StochasticCellRescaling,
    "stochastic_cell_rescaling": StochasticCellRescaling,
}
