"""Radial basis expansions of interatomic distances.  d [P] -> [P, n_rbf]."""

from __future__ import annotations

import math

import torch
from torch import nn


class GaussianRBF(nn.Module):
    """Gaussians exp(-(d - mu_k)^2 / (2 w^2)) with centres evenly spaced on [start, cutoff]
    and widths equal to the spacing."""

    def __init__(self, n_rbf: int, cutoff: float, start: float = 0.0, trainable: bool = False):
        super().__init__()
        if n_rbf < 2:
            raise ValueError(f"n_rbf must be at least 2, got {n_rbf}")
        self.n_rbf = n_rbf
        offsets = torch.linspace(start, cutoff, n_rbf)
        widths = torch.full((n_rbf,), float(offsets[1] - offsets[0]))
        self._register(offsets, widths, trainable)

    def _register(self, offsets: torch.Tensor, widths: torch.Tensor, trainable: bool) -> None:
        self.trainable = trainable
        if trainable:
            self.offsets = nn.Parameter(offsets)
            self.widths = nn.Parameter(widths)
        else:
            self.register_buffer("offsets", offsets)
            self.register_buffer("widths", widths)
            # derived constant (not saved): -1 / (2 w^2)
            self.register_buffer("_coeff", -0.5 / widths**2, persistent=False)

    def _apply(self, fn, *args, **kwargs):  # keep the derived constant consistent after .to()/.double()
        out = super()._apply(fn, *args, **kwargs)
        if not self.trainable:
            self._coeff = -0.5 / self.widths**2
        return out

    def _load_from_state_dict(self, *args, **kwargs):  # widths may change on loading
        super()._load_from_state_dict(*args, **kwargs)
        if not self.trainable:
            self._coeff = -0.5 / self.widths**2

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        coeff = self._coeff if not self.trainable else -0.5 / self.widths**2
        diff = d[:, None] - self.offsets
        return torch.exp(coeff * (diff * diff))


class GaussianRBFCentered(GaussianRBF):
    """Gaussians centred at zero with widths evenly spaced on [start, cutoff]."""

    def __init__(self, n_rbf: int, cutoff: float, start: float = 1.0, trainable: bool = False):
        nn.Module.__init__(self)
        if n_rbf < 1:
            raise ValueError(f"n_rbf must be positive, got {n_rbf}")
        if not start > 0:
            raise ValueError(f"the smallest width (start) must be positive, got {start}")
        self.n_rbf = n_rbf
        widths = torch.linspace(start, cutoff, n_rbf)
        self._register(torch.zeros(n_rbf), widths, trainable)


class BesselRBF(nn.Module):
    """sin(n pi d / rc) / d for n = 1..n_rbf (the 1/d singularity at d = 0 is guarded)."""

    def __init__(self, n_rbf: int, cutoff: float, trainable: bool = False):
        super().__init__()
        if n_rbf < 1:
            raise ValueError(f"n_rbf must be positive, got {n_rbf}")
        self.n_rbf = n_rbf
        freqs = torch.arange(1, n_rbf + 1, dtype=torch.get_default_dtype()) * (math.pi / cutoff)
        if trainable:
            self.freqs = nn.Parameter(freqs)
        else:
            self.register_buffer("freqs", freqs)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        safe = torch.where(d == 0, torch.ones_like(d), d)
        ax = safe[:, None] * self.freqs
        return torch.sin(ax) / safe[:, None]


_RBFS = {"gaussian": GaussianRBF, "gaussian_centered": GaussianRBFCentered, "bessel": BesselRBF}


def build_rbf(name: str, n_rbf: int, cutoff: float, **kwargs) -> nn.Module:
    """Radial basis from its name: ``gaussian``, ``gaussian_centered`` or ``bessel``."""
    if name not in _RBFS:
        raise ValueError(f"unknown radial basis {name!r}; choose one of {sorted(_RBFS)}")
    return _RBFS[name](n_rbf, cutoff, **kwargs)
