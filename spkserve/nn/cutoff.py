"""Cutoff functions: smooth switches from 1 at r = 0 to exactly 0 at and beyond the cutoff.

Pairs beyond the cutoff (skin neighbor lists) get exactly zero weight, and the
gradient there is zero as well (no NaN from the masked branch).
"""

from __future__ import annotations

import math

import torch
from torch import nn


def cosine_cutoff(d: torch.Tensor, cutoff: float) -> torch.Tensor:
    """0.5 (cos(pi d / rc) + 1) for d < rc, else 0."""
    f = 0.5 * (torch.cos(d * (math.pi / cutoff)) + 1.0)
    return f * (d < cutoff).to(d.dtype)


def mollifier_cutoff(d: torch.Tensor, cutoff: float, eps: float = 1.0e-7) -> torch.Tensor:
    """exp(1 - 1 / (1 - (d/rc)^2)) for d < rc, else 0 (infinitely smooth at rc)."""
    inside = d + eps < cutoff
    x2 = torch.where(inside, (d / cutoff) ** 2, torch.zeros_like(d))
    f = torch.exp(1.0 - 1.0 / (1.0 - x2))
    return f * inside.to(d.dtype)


class CosineCutoff(nn.Module):
    """Cosine cutoff module (``cutoff`` in the model's length unit)."""

    def __init__(self, cutoff: float):
        super().__init__()
        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        self.cutoff = float(cutoff)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return cosine_cutoff(d, self.cutoff)


class MollifierCutoff(nn.Module):
    """Mollifier cutoff module (``cutoff`` in the model's length unit)."""

    def __init__(self, cutoff: float, eps: float = 1.0e-7):
        super().__init__()
        if not cutoff > 0:
            raise ValueError(f"cutoff must be positive, got {cutoff}")
        self.cutoff = float(cutoff)
        self.eps = float(eps)

    def forward(self, d: torch.Tensor) -> torch.Tensor:
        return mollifier_cutoff(d, self.cutoff, self.eps)


_CUTOFFS = {"cosine": CosineCutoff, "mollifier": MollifierCutoff}


def build_cutoff(name: str, cutoff: float) -> nn.Module:
    """Cutoff module from its name (``"cosine"`` or ``"mollifier"``)."""
    if name not in _CUTOFFS:
        raise ValueError(f"unknown cutoff function {name!r}; choose one of {sorted(_CUTOFFS)}")
    return _CUTOFFS[name](cutoff)
