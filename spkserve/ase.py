"""ASE calculator on a bundle (or on any force provider).

    from spkserve.ase import BundleCalculator
    atoms.calc = BundleCalculator("model.bundle")

Energies in eV, forces in eV/Å, stress in eV/Å³ (Voigt order, ASE's sign
convention) for fully periodic systems; the bundle's other outputs (e.g.
``polarizability``, ``nuclear_magnetic_shielding``) are available when listed in
``extra_properties``. A bundle's ``dipole_moment`` (e·Å) is also offered under ASE's
own name ``dipole``, so ``atoms.get_dipole_moment()`` and ``ase.vibrations.Infrared``
work; it is computed only when asked for. The skin neighbor list is reused between calls.
"""

from __future__ import annotations

import os
from typing import Sequence

import numpy as np
from ase.calculators.calculator import Calculator, CalculatorSetupError, PropertyNotImplementedError, all_changes
from ase.stress import full_3x3_to_voigt_6_stress

from spkserve import keys
from spkserve.batch import Structure
from spkserve.provider import ForceProvider, ProviderError


class ProviderCalculator(Calculator):
    """ASE calculator over any :class:`~spkserve.provider.ForceProvider` (results in eV, Å)."""

    def __init__(self, provider: ForceProvider, extra_properties: Sequence[str] = (), **kwargs) -> None:
        super().__init__(**kwargs)
        self.provider = provider
        available = tuple(provider.available_properties)
        self.implemented_properties = ["energy", "free_energy", "energies", "forces"]
        if keys.stress in available:
            self.implemented_properties.append("stress")
        # ASE's name for the dipole is "dipole"; accept it as an alias of dipole_moment
        self.extra_properties = tuple(keys.dipole_moment if p == "dipole" else p for p in extra_properties)
        for p in self.extra_properties:
            if p not in available:
                raise CalculatorSetupError(f"the model cannot compute {p!r}; it provides {sorted(available)}")
        self.implemented_properties += list(self.extra_properties)
        if keys.dipole_moment in available:
            self.implemented_properties.append("dipole")

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        super().calculate(atoms, properties, system_changes)
        wanted = [keys.energy, keys.forces]
        periodic = bool(np.all(self.atoms.pbc))
        if "stress" in properties:
            if not periodic:
                raise PropertyNotImplementedError("stress needs a fully periodic system (atoms.pbc all True)")
            wanted.append(keys.stress)
        elif periodic and keys.stress in self.provider.available_properties:
            wanted.append(keys.stress)  # cheap with the strain trick, saves a second call
        available = self.provider.available_properties
        wanted += [p for p in self.extra_properties if p in available]
        if "dipole" in properties and keys.dipole_moment not in wanted:
            wanted.append(keys.dipole_moment)
        if keys.atomic_energies in available:
            wanted.append(keys.atomic_energies)
        try:
            out = self.provider.compute([Structure.from_atoms(self.atoms)], wanted)
        except ProviderError as err:
            raise CalculatorSetupError(str(err)) from err
        e = float(out[keys.energy][0])
        self.results["energy"] = e
        self.results["free_energy"] = e
        self.results["forces"] = out[keys.forces].numpy().copy()
        if keys.atomic_energies in out:
            self.results["energies"] = out[keys.atomic_energies].numpy().copy()
        if keys.stress in out:
            self.results["stress"] = full_3x3_to_voigt_6_stress(out[keys.stress][0].numpy())
        for p in wanted[2:]:
            if p in (keys.stress, keys.atomic_energies):
                continue
            v = out[p].numpy()
            self.results[p] = v[0].copy() if p not in keys.PER_ATOM_OUTPUTS else v.copy()
        if keys.dipole_moment in self.results:
            self.results["dipole"] = self.results[keys.dipole_moment]


class BundleCalculator(ProviderCalculator):
    """ASE calculator on a bundle file (or a :class:`~spkserve.runtime.ModelRunner`).

    An ensemble manifest (``spktrain ensemble``) works as one model: the results are the
    committee means, and ``extra_properties=["energy_uncertainty", "forces_uncertainty",
    "committee_energy"]`` adds the spread and the member energies (eV, eV/Å).

    Args:
        bundle: path of a bundle or an ensemble manifest, or a ModelRunner / EnsembleRunner.
        dtype: evaluate in float32/float64 (default as stored).
        device: torch device.
        skin_angstrom: neighbor-list skin (rebuilds only when atoms moved > skin/2).
        extra_properties: further bundle outputs to compute, e.g. ``["dipole_moment"]``.
    """

    def __init__(
        self,
        bundle,
        dtype: str | None = None,
        device: str = "cpu",
        skin_angstrom: float = 1.0,
        extra_properties: Sequence[str] = (),
        **kwargs,
    ) -> None:
        from spkserve.ensemble import open_runner

        runner = bundle if hasattr(bundle, "compute_tensors") else open_runner(
            os.fspath(bundle), dtype=dtype, device=device, skin_angstrom=skin_angstrom
        )
        super().__init__(runner, extra_properties=extra_properties, **kwargs)
        self.runner = runner
