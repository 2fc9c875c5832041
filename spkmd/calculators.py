"""Calculators: turn a :class:`~spkmd.system.System` into forces, energies, stress.

A calculator has one narrow method, :meth:`Calculator.calculate`, which sets
``system.forces`` [R, N, 3], ``system.energy`` [R, M], ``system.stress``
[R, M, 3, 3] (if requested) and ``system.properties`` (further outputs) in
atomic units. All molecules and replicas go to the force provider in ONE call
(``R*M`` structures).

* :class:`ProviderCalculator` adapts any :class:`spkserve.provider.ForceProvider`
  (local bundle runner, remote msgpack server, i-PI server ...). If the provider
  has the tensor fast path ``compute_tensors(numbers, positions_A, cells_A, pbc,
  n_atoms, properties)`` (``spkserve.runtime.ModelRunner`` does) it is used,
  else ``compute(structures, properties)``. Results in provider units (Å, eV)
  are converted to atomic units here and nowhere else.
* :class:`BundleCalculator` = ProviderCalculator on a ``ModelRunner``.
* :class:`EnsembleCalculator`: mean and spread of several providers, with an
  optional threshold that flags or stops the run and saves the uncertain frames.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from spkserve import keys, units
from spkserve.provider import PROVIDER_UNITS
from spkmd.system import System

log = logging.getLogger(__name__)

#: atomic units of the outputs whose provider unit is known
MD_PROPERTY_UNITS = {
    "energy": "Hartree",
    "forces": "Hartree/Bohr",
    "stress": "Hartree/Bohr^3",
    "dipole_moment": "e*Bohr",
    "partial_charges": "e",
    "polarizability": "e^2*Bohr^2/Hartree",
    "nuclear_magnetic_shielding": "ppm",
    "energy_uncertainty": "Hartree",
}
PROVIDER_UNITS_ALL = dict(PROVIDER_UNITS, energy_uncertainty="eV")

#: minimum distance between two atoms accepted before a run (Å)
MIN_DISTANCE_ANGSTROM = 0.5


class CalculatorError(RuntimeError):
    """The calculator cannot evaluate this system (message names why)."""


class UncertaintyExceeded(RuntimeError):
    """The ensemble spread went above the threshold and the run was told to stop."""


class Calculator:
    """Base: ``calculate(system)`` fills forces/energy/stress/properties in atomic units."""

    #: outputs requested besides energy and forces
    properties: tuple[str, ...] = ()

    def calculate(self, system: System) -> None:
        raise NotImplementedError

    def check(self, system: System) -> None:
        """Validate the system before a run (elements, cutoff vs cell, overlapping atoms)."""
        check_overlaps(system)

    def to(self, device=None, dtype=None) -> "Calculator":
        return self

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


def check_overlaps(system: System, min_distance_angstrom: float = MIN_DISTANCE_ANGSTROM) -> None:
    """Raise :class:`CalculatorError` naming the atoms closer than ``min_distance_angstrom`` (any replica)."""
    from spkserve.neighbors import neighbor_list

    to_A = units.factor("Bohr", "Angstrom")
    for r in range(system.n_replicas):
        pos = system.positions[r].detach() * to_A
        cells = system.cells[r].detach() * to_A
        i, j, s = neighbor_list(pos, cells, system.pbc, system.n_atoms, min_distance_angstrom)
        if len(i):
            d = (pos[j] - pos[i] + torch.einsum("pk,pkl->pl", s.to(pos.dtype), cells[system.molecule_index[i]])).norm(dim=-1)
            k = int(torch.argmin(d))
            a, b = int(i[k]), int(j[k])
            mol = int(system.molecule_index[a])
            first = int(system.molecule_slice(mol).start)
            raise CalculatorError(
                f"atoms {a - first} and {b - first} of molecule {mol} (replica {r}) are {float(d[k]):.3f} Å apart, "
                f"closer than {min_distance_angstrom} Å; fix the start structure (wrong length_unit?)"
            )


def check_cutoff(system: System, cutoff_angstrom: float, max_cell_images: float = 2.0) -> None:
    """Raise if a periodic cell is so small that the cutoff sphere spans more than
    ``max_cell_images`` cell widths (a sign of a wrong cell or length unit)."""
    to_A = units.factor("Bohr", "Angstrom")
    for m in range(system.n_molecules):
        pbc = system.pbc[m]
        if not bool(pbc.any()):
            continue
        cell = system.cells[0, m].detach().double() * to_A
        vol = abs(float(torch.linalg.det(cell)))
        for d in range(3):
            if not bool(pbc[d]):
                continue
            a, b = cell[(d + 1) % 3], cell[(d + 2) % 3]
            width = vol / float(torch.linalg.cross(a, b).norm())
            if cutoff_angstrom > max_cell_images * width:
                raise CalculatorError(
                    f"cutoff {cutoff_angstrom:.3f} Å is larger than {max_cell_images:g}× the cell width "
                    f"{width:.3f} Å of molecule {m} along lattice vector {d}; use a larger cell "
                    "(e.g. atoms.repeat) or check the length unit"
                )


class ProviderCalculator(Calculator):
    """Adapt a :class:`~spkserve.provider.ForceProvider` to the MD engine.

    Args:
        provider: any ForceProvider (results in Å / eV).
        properties: outputs wanted besides energy and forces (e.g. ``("dipole_moment",)``);
            ``"stress"`` for NPT and pressure.
        stress: request stress (``None``: when every molecule is fully periodic and the
            provider offers it).
    """

    def __init__(self, provider, properties: Sequence[str] = (), stress: bool | None = None) -> None:
        self.provider = provider
        self.properties = tuple(p for p in properties if p not in (keys.energy, keys.forces))
        self.stress = stress
        available = tuple(getattr(provider, "available_properties", ()) or ())
        missing = [p for p in self.properties if available and p not in available]
        if missing:
            raise CalculatorError(f"the provider cannot compute {missing}; it offers {list(available)}")
        self._available = available
        self._fast = callable(getattr(provider, "compute_tensors", None))
        self._cache_key = None
        self._to_A = units.factor("Bohr", "Angstrom")
        self._factors: dict[str, float] = {}

    def _wanted(self, system: System) -> tuple[str, ...]:
        want = [keys.energy, keys.forces, *self.properties]
        stress = self.stress
        if stress is None:
            stress = bool(system.pbc.all()) and (not self._available or keys.stress in self._available)
        if stress and keys.stress not in want:
            want.append(keys.stress)
        return tuple(want)

    def _factor(self, name: str) -> float:
        f = self._factors.get(name)
        if f is None:
            src, dst = PROVIDER_UNITS_ALL.get(name), MD_PROPERTY_UNITS.get(name)
            f = units.factor(src, dst) if src and dst else 1.0
            self._factors[name] = f
        return f

    def _static(self, system: System):
        """Replica-tiled numbers, pbc and n_atoms (cached per system layout)."""
        key = (system.n_replicas, system.n_atoms_total, system.n_molecules, system.device)
        if self._cache_key != key:
            R = system.n_replicas
            self._numbers = system.atomic_numbers.repeat(R)
            self._pbc = system.pbc.repeat(R, 1)
            self._n_atoms = system.n_atoms.repeat(R)
            self._want = self._wanted(system)
            self._cache_key = key
        return self._numbers, self._pbc, self._n_atoms

    def raw(self, system: System) -> dict[str, torch.Tensor]:
        """One provider call for all replicas and molecules; outputs in atomic units,
        shaped [R, M, ...] (per system) or [R, N, ...] (per atom)."""
        numbers, pbc, n_atoms = self._static(system)
        R, N, M = system.n_replicas, system.n_atoms_total, system.n_molecules
        pos_A = system.positions.reshape(R * N, 3) * self._to_A
        cells_A = system.cells.reshape(R * M, 3, 3) * self._to_A
        if self._fast:
            out = self.provider.compute_tensors(numbers, pos_A, cells_A, pbc, n_atoms, self._want)
        else:
            out = self.provider.compute(self._structures(numbers, pos_A, cells_A, pbc, n_atoms), self._want)
        res = {}
        dtype, dev = system.dtype, system.device
        for name, value in out.items():
            v = value.to(device=dev, dtype=dtype) if value.is_floating_point() else value.to(dev)
            f = self._factor(name)
            if f != 1.0:
                v = v * f
            if name in keys.PER_ATOM_OUTPUTS:
                v = v.reshape((R, N) + tuple(v.shape[1:]))
            else:
                v = v.reshape((R, M) + tuple(v.shape[1:]))
            res[name] = v
        missing = [p for p in self._want if p not in res]
        if missing:
            raise CalculatorError(f"the provider returned no {missing} (it returned {sorted(res)})")
        return res

    @staticmethod
    def _structures(numbers, pos_A, cells_A, pbc, n_atoms):
        from spkserve.batch import Structure

        Z = numbers.cpu().numpy()
        P = pos_A.detach().cpu().double().numpy()
        C = cells_A.detach().cpu().double().numpy()
        B = pbc.cpu().numpy()
        bounds = np.concatenate([[0], np.cumsum(n_atoms.cpu().numpy())])
        return [
            Structure(Z[bounds[s] : bounds[s + 1]], P[bounds[s] : bounds[s + 1]], C[s], B[s])
            for s in range(len(bounds) - 1)
        ]

    def calculate(self, system: System) -> None:
        res = self.raw(system)
        system.forces = res.pop(keys.forces)
        system.energy = res.pop(keys.energy)
        system.stress = res.pop(keys.stress, None)
        system.properties = res

    def check(self, system: System) -> None:
        check_overlaps(system)
        cutoff = getattr(self.provider, "cutoff_angstrom", None)
        if cutoff:
            check_cutoff(system, float(cutoff))
        bundle = getattr(self.provider, "bundle", None)
        if bundle is not None:
            species = set(int(z) for z in bundle.species)
            unknown = sorted(set(system.atomic_numbers.tolist()) - species)
            if unknown:
                raise CalculatorError(
                    f"elements {unknown} are not in the bundle's species {sorted(species)}; "
                    "use a model trained on them"
                )

    def close(self) -> None:
        self.provider.close()

    # A skin neighbor list's pair ORDER depends on when it was last built, and the order of
    # floating-point sums follows it. For a bit-for-bit restart the checkpoint therefore holds
    # the list (reference positions and pairs). Providers may offer state_dict()/load_state_dict()
    # themselves; for spkserve's ModelRunner the SkinNeighborList fields are saved.
    _NL_FIELDS = ("_ref_positions", "_ref_cell", "_ref_pbc", "_ref_n_atoms")

    def state_dict(self) -> dict:
        if callable(getattr(self.provider, "state_dict", None)):
            return {"provider": self.provider.state_dict()}
        nl = getattr(self.provider, "neighbors", None)
        if nl is not None and getattr(nl, "_pairs", None) is not None and all(hasattr(nl, f) for f in self._NL_FIELDS):
            state = {f: getattr(nl, f).clone() for f in self._NL_FIELDS}
            state["pairs"] = [t.clone() for t in nl._pairs]
            return {"skin_neighbor_list": state}
        return {}

    def load_state_dict(self, state: dict) -> None:
        if "provider" in state:
            self.provider.load_state_dict(state["provider"])
        elif "skin_neighbor_list" in state:
            nl = self.provider.neighbors
            st = state["skin_neighbor_list"]
            for f in self._NL_FIELDS:
                setattr(nl, f, st[f])
            nl._pairs = tuple(st["pairs"])


class BundleCalculator(ProviderCalculator):
    """A :class:`ProviderCalculator` on a local ``spkserve.runtime.ModelRunner``.

    Args:
        model_file: bundle path.
        skin_angstrom: Verlet skin of the neighbor list.
        dtype: evaluate in ``"float32"``/``"float64"`` (default: as in the bundle).
        device: torch device.
        properties: extra outputs (e.g. ``("dipole_moment",)``).
        neighbor_backend: neighbor-list backend.
        cutoff_angstrom: if given, must not be smaller than the bundle's cutoff (it is checked,
            the bundle's own cutoff is used).
    """

    def __init__(
        self,
        model_file: str | os.PathLike,
        skin_angstrom: float = 1.0,
        dtype: str | torch.dtype | None = None,
        device: str | torch.device = "cpu",
        properties: Sequence[str] = (),
        neighbor_backend: str = "vesin",
        cutoff_angstrom: float | None = None,
        stress: bool | None = None,
        compile: bool = False,
    ) -> None:
        from spkserve.runtime import ModelRunner

        path = Path(model_file)
        if not path.is_file():
            raise FileNotFoundError(f"model bundle {str(path)!r} does not exist")
        runner = ModelRunner(path, dtype=dtype, device=device, skin_angstrom=skin_angstrom,
                             neighbor_backend=neighbor_backend, compile=compile)
        if cutoff_angstrom is not None and runner.cutoff_angstrom > 0 and cutoff_angstrom + 1e-9 < runner.cutoff_angstrom:
            raise CalculatorError(
                f"neighbor-list cutoff {cutoff_angstrom} Å is smaller than the bundle's cutoff "
                f"{runner.cutoff_angstrom:.4g} Å; remove calculator.neighbor_list.cutoff or raise it"
            )
        self.model_file = str(path)
        super().__init__(runner, properties=properties, stress=stress)

    def to(self, device=None, dtype=None) -> "BundleCalculator":
        """Move the model (``Simulator.to`` calls this): results then come in ``dtype``."""
        runner = self.provider
        runner.model.to(device=device, dtype=dtype)
        if device is not None:
            runner.device = torch.device(device)
        if dtype is not None:
            runner.dtype = dtype
        return self


class EnsembleCalculator(Calculator):
    """Mean and spread of several providers (e.g. bundles trained with different seeds).

    Sets ``system.properties["energy_uncertainty"]`` [R, M] (standard deviation of the
    energies, Hartree) and ``"forces_uncertainty"`` [R, M] (largest per-atom force
    standard deviation, Hartree/Bohr).

    Args:
        members: ProviderCalculators, ForceProviders or bundle paths.
        threshold_energy_eV / threshold_forces_eV_per_angstrom: spreads above these flag a frame.
        on_exceed: ``"flag"`` (log and save the frame), ``"stop"`` (save, then raise
            :class:`UncertaintyExceeded`) or ``"reference"`` (save, then replace the energy and
            forces of the flagged molecules in this step by those of ``reference``; the property
            ``reference_used`` [R, M] is 1 where that happened).
        reference: an ASE calculator (eV, Å) for ``on_exceed="reference"``.
        uncertain_frames_file: extxyz file the flagged frames are appended to (per molecule and replica).
    """

    def __init__(
        self,
        members: Sequence,
        properties: Sequence[str] = (),
        threshold_energy_eV: float | None = None,
        threshold_forces_eV_per_angstrom: float | None = None,
        on_exceed: str = "flag",
        uncertain_frames_file: str | os.PathLike | None = None,
        reference=None,
        **bundle_kwargs,
    ) -> None:
        if len(members) < 2:
            raise CalculatorError(f"an ensemble needs at least 2 members, got {len(members)}")
        if on_exceed not in ("flag", "stop", "reference"):
            raise ValueError(f"on_exceed must be 'flag', 'stop' or 'reference', got {on_exceed!r}")
        if (on_exceed == "reference") != (reference is not None):
            raise ValueError("on_exceed='reference' needs a reference calculator, and a reference needs on_exceed='reference'")
        self.reference = reference
        self.n_reference_steps = 0
        self.members = []
        for m in members:
            if isinstance(m, ProviderCalculator):
                self.members.append(m)
            elif isinstance(m, (str, os.PathLike)):
                self.members.append(BundleCalculator(m, properties=properties, **bundle_kwargs))
            else:
                self.members.append(ProviderCalculator(m, properties=properties))
        from spkserve.ensemble import check_compatible

        # different species or units in one committee: refused (EnsembleError names the member)
        metas = [getattr(m.provider, "metadata", None) for m in self.members]
        if all(metas):  # bundle members; other providers describe themselves differently
            check_compatible(metas, [getattr(m, "model_file", repr(m.provider)) for m in self.members])
        self.properties = tuple(properties)
        self.threshold_energy = None if threshold_energy_eV is None else threshold_energy_eV * units.factor("eV", "Hartree")
        self.threshold_forces = (
            None if threshold_forces_eV_per_angstrom is None
            else threshold_forces_eV_per_angstrom * units.factor("eV/Angstrom", "Hartree/Bohr")
        )
        self.on_exceed = on_exceed
        self.uncertain_frames_file = None if uncertain_frames_file is None else Path(uncertain_frames_file)
        self.n_flagged = 0

    def calculate(self, system: System) -> None:
        results = [m.raw(system) for m in self.members]
        stacked = {k: torch.stack([r[k] for r in results]) for k in results[0]}
        mean = {k: v.mean(0) for k, v in stacked.items()}
        e_std = stacked[keys.energy].std(0, unbiased=False)  # [R, M]
        f_std_atom = stacked[keys.forces].std(0, unbiased=False).norm(dim=-1)  # [R, N]
        f_std = f_std_atom.new_full((system.n_replicas, system.n_molecules), -math.inf)
        f_std = f_std.scatter_reduce(1, system.molecule_index.expand_as(f_std_atom), f_std_atom, "amax")
        system.forces = mean.pop(keys.forces)
        system.energy = mean.pop(keys.energy)
        system.stress = mean.pop(keys.stress, None)
        mean["energy_uncertainty"] = e_std
        mean["forces_uncertainty"] = f_std
        if self.reference is not None:
            mean["reference_used"] = torch.zeros_like(e_std)  # logged every step, 1 where the reference ran
        system.properties = mean
        flagged = torch.zeros_like(e_std, dtype=torch.bool)
        if self.threshold_energy is not None:
            flagged |= e_std > self.threshold_energy
        if self.threshold_forces is not None:
            flagged |= f_std > self.threshold_forces
        if self.threshold_energy is not None or self.threshold_forces is not None:
            if bool(flagged.any()):
                self._handle(system, flagged)

    def _handle(self, system: System, flagged: torch.Tensor) -> None:
        pairs = torch.nonzero(flagged).tolist()
        self.n_flagged += len(pairs)
        if self.uncertain_frames_file is not None:
            import ase.io

            frames = []
            for r, m in pairs:
                atoms = system.to_atoms(replica=r, molecule=m)[0]
                atoms.info.update(
                    replica=r, molecule=m,
                    energy_uncertainty_eV=float(system.properties["energy_uncertainty"][r, m]) * units.factor("Hartree", "eV"),
                    forces_uncertainty_eV_per_A=float(system.properties["forces_uncertainty"][r, m])
                    * units.factor("Hartree/Bohr", "eV/Angstrom"),
                )
                frames.append(atoms)
            self.uncertain_frames_file.parent.mkdir(parents=True, exist_ok=True)
            ase.io.write(str(self.uncertain_frames_file), frames, format="extxyz", append=True)
        msg = f"ensemble spread above threshold for (replica, molecule) {pairs[:10]}"
        if self.on_exceed == "reference":
            self._use_reference(system, pairs)
            log.info(msg + "; reference calculator used for them in this step")
            return
        if self.on_exceed == "stop":
            raise UncertaintyExceeded(msg + (f"; frames saved to {self.uncertain_frames_file}" if self.uncertain_frames_file else ""))
        log.warning(msg)

    def _use_reference(self, system: System, pairs: list[list[int]]) -> None:
        """Energy and forces of the flagged (replica, molecule) pairs from the reference (ASE, eV/Å)."""
        e_f = units.factor("eV", "Hartree")
        f_f = units.factor("eV/Angstrom", "Hartree/Bohr")
        used = system.properties["reference_used"].clone()
        forces = system.forces.clone()
        energy = system.energy.clone()
        for r, m in pairs:
            atoms = system.to_atoms(replica=r, molecule=m)[0]
            atoms.calc = self.reference
            try:
                e = float(atoms.get_potential_energy())
                f = np.asarray(atoms.get_forces(), dtype=np.float64)
            except Exception as err:  # noqa: BLE001 - the reference's own error, named
                raise CalculatorError(f"the reference calculator failed for replica {r}, molecule {m}: {err}") from err
            if not (math.isfinite(e) and np.isfinite(f).all()):
                raise CalculatorError(f"the reference calculator returned non-finite values for replica {r}, molecule {m}")
            sl = system.molecule_slice(m)
            forces[r, sl] = torch.as_tensor(f * f_f, dtype=forces.dtype, device=forces.device)
            energy[r, m] = e * e_f
            used[r, m] = 1.0
        system.forces = forces
        system.energy = energy
        system.properties["reference_used"] = used
        self.n_reference_steps += 1

    def check(self, system: System) -> None:
        for m in self.members:
            m.check(system)

    def close(self) -> None:
        for m in self.members:
            m.close()


def load_provider(name: str, **params):
    """Build a provider from ``"package.module:ClassOrFactory"`` and keyword parameters
    (e.g. a remote msgpack client or an i-PI server written elsewhere)."""
    if ":" not in name:
        raise ValueError(f"provider {name!r} must be given as 'module:attribute' (e.g. 'spkserve.server.client:RemoteProvider')")
    module, attr = name.split(":", 1)
    try:
        obj = getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError) as err:
        raise ValueError(f"cannot import provider {name!r}: {err}") from err
    return obj(**params)
