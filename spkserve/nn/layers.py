"""Dense layers, activations by name and small MLP builders."""

from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from torch import nn
from torch.nn import functional as F

LOG2 = math.log(2.0)


def shifted_softplus(x: torch.Tensor) -> torch.Tensor:
    """softplus(x) - log(2): zero at x = 0, smooth, unbounded above."""
    return F.softplus(x) - LOG2


class ShiftedSoftplus(nn.Module):
    """Module form of :func:`shifted_softplus`."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return shifted_softplus(x)


_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "shifted_softplus": ShiftedSoftplus,
    "ssp": ShiftedSoftplus,
    "silu": nn.SiLU,
    "swish": nn.SiLU,
    "softplus": nn.Softplus,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "gelu": nn.GELU,
    "identity": nn.Identity,
}


def activation(name: str | None) -> nn.Module:
    """Activation module from its name (``None`` or ``"identity"`` for none)."""
    if name is None:
        return nn.Identity()
    if not isinstance(name, str) or name.lower() not in _ACTIVATIONS:
        raise ValueError(f"unknown activation {name!r}; choose one of {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name.lower()]()


def activation_names() -> list[str]:
    """Names accepted by :func:`activation`."""
    return sorted(_ACTIVATIONS)


class Dense(nn.Linear):
    """Linear layer followed by an optional activation (given by name).

    Weights use Xavier-uniform initialisation and zero bias.
    """

    def __init__(self, n_in: int, n_out: int, activation_name: str | None = None, bias: bool = True):
        super().__init__(n_in, n_out, bias=bias)
        self.activation = activation(activation_name)

    def reset_parameters(self) -> None:
        nn.init.xavier_uniform_(self.weight)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.activation(F.linear(x, self.weight, self.bias))


def build_mlp(
    n_in: int,
    n_out: int,
    n_hidden: int | Sequence[int] | None = None,
    n_layers: int = 2,
    activation_name: str = "silu",
    last_bias: bool = True,
    last_zero_init: bool = False,
) -> nn.Sequential:
    """MLP ``n_in -> ... -> n_out`` with ``n_layers`` dense layers.

    ``n_hidden`` is one width for all hidden layers or a list of widths; by
    default the width halves from layer to layer (SchNetPack's pyramid).
    The last layer has no activation.
    """
    if n_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got n_layers={n_layers}")
    if n_hidden is None:
        widths = []
        c = n_in
        for _ in range(n_layers - 1):
            c = max(n_out, c // 2)
            widths.append(c)
    elif isinstance(n_hidden, int):
        widths = [n_hidden] * (n_layers - 1)
    else:
        widths = [int(w) for w in n_hidden]
        if len(widths) != n_layers - 1:
            raise ValueError(f"n_hidden lists {len(widths)} widths but n_layers={n_layers} needs {n_layers - 1}")
    sizes = [n_in] + widths
    layers: list[nn.Module] = [Dense(a, b, activation_name) for a, b in zip(sizes[:-1], sizes[1:])]
    last = Dense(sizes[-1], n_out, None, bias=last_bias)
    if last_zero_init:
        nn.init.zeros_(last.weight)
    layers.append(last)
    return nn.Sequential(*layers)
