"""What every force provider offers: local bundles, remote servers, external programs.

A force provider turns a list of structures (Å) into energies and forces in
fixed *provider units*: Å, eV, eV/Å, eV/Å³ (stress), e·Å (dipole), e (charges).
Whatever the bundle or the external program uses internally is converted at
its own border, so the MD engine and the ASE calculators never see a
bundle's units.

Results are one dict of tensors for the whole batch in the batch layout of
:mod:`spkserve.keys` (``energy`` [S], ``forces`` [N, 3], ``stress`` [S, 3, 3], ...).
"""

from __future__ import annotations

from typing import Protocol, Sequence, runtime_checkable

import torch

from spkserve.batch import Structure

#: units of everything a provider returns
PROVIDER_UNITS = {
    "length": "Angstrom",
    "energy": "eV",
    "forces": "eV/Angstrom",
    "stress": "eV/Angstrom^3",
    "dipole_moment": "e*Angstrom",
    "partial_charges": "e",
    "polarizability": "e*Angstrom^2/V",
    "nuclear_magnetic_shielding": "ppm",
}


class ProviderError(RuntimeError):
    """A force provider could not compute what was asked (message names why)."""


@runtime_checkable
class ForceProvider(Protocol):
    """Anything that computes energies and forces for a batch of structures."""

    #: properties this provider can return (e.g. ("energy", "forces", "stress"))
    available_properties: tuple[str, ...]

    def compute(
        self, structures: Sequence[Structure], properties: Sequence[str] = ("energy", "forces")
    ) -> dict[str, torch.Tensor]:
        """Evaluate all structures together; results in provider units (float64, CPU)."""
        ...

    def close(self) -> None:
        """Release sockets, threads and processes held by the provider."""
        ...
