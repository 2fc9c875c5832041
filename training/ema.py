"""Exponential moving average (EMA) of model weights.

After every optimizer step ``shadow = decay * shadow + (1 - decay) * weight``
for every trainable parameter (buffers such as energy offsets are constants and
are never averaged: averaging would only add rounding noise). The averaged weights are what
validation, the best-model checkpoint and the exported bundle use; training
itself continues on the raw weights.

    ema = ExponentialMovingAverage(model, decay=0.995)
    ...optimizer.step(); ema.update(model)
    with ema.average_weights(model):
        evaluate(model)
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn


class ExponentialMovingAverage:
    """Shadow copy of a model's trainable parameters (keys as in ``model.state_dict()``).

    Args:
        model: the module whose weights are averaged.
        decay: weight of the old average per update, in [0, 1).
        warmup: if True, the effective decay is ``min(decay, (1 + n) / (10 + n))``
            after ``n`` updates, so early (random) weights are forgotten quickly.
    """

    def __init__(self, model: nn.Module, decay: float = 0.995, warmup: bool = True) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay!r}")
        self.decay = float(decay)
        self.warmup = bool(warmup)
        self.num_updates = 0
        self.shadow: dict[str, torch.Tensor] = {
            k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad and v.is_floating_point()
        }
        if not self.shadow:
            raise ValueError("the model has no trainable floating-point parameters to average")

    def _effective_decay(self) -> float:
        if self.warmup:
            return min(self.decay, (1.0 + self.num_updates) / (10.0 + self.num_updates))
        return self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Fold the current weights of ``model`` into the average."""
        decay = self._effective_decay()
        state = model.state_dict()
        for k, s in self.shadow.items():
            w = state[k].detach()
            if s.device != w.device or s.dtype != w.dtype:
                s = self.shadow[k] = s.to(device=w.device, dtype=w.dtype)
            s.mul_(decay).add_(w, alpha=1.0 - decay)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Overwrite the weights of ``model`` with the average."""
        state = model.state_dict()
        for k, s in self.shadow.items():
            state[k].copy_(s)

    @contextlib.contextmanager
    def average_weights(self, model: nn.Module) -> Iterator[nn.Module]:
        """Temporarily load the averaged weights into ``model``; restore the raw ones after."""
        state = model.state_dict()
        backup = {k: state[k].detach().clone() for k in self.shadow}
        self.copy_to(model)
        try:
            yield model
        finally:
            with torch.no_grad():
                for k, v in backup.items():
                    state[k].copy_(v)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "num_updates": self.num_updates,
                "shadow": {k: v.clone() for k, v in self.shadow.items()}}

    def load_state_dict(self, state: dict) -> None:
        missing = set(self.shadow) - set(state["shadow"])
        if missing:
            raise KeyError(f"EMA state lacks weights {sorted(missing)[:5]}")
        self.decay = float(state["decay"])
        self.warmup = bool(state.get("warmup", True))
        self.num_updates = int(state["num_updates"])
        self.shadow = {k: v.detach().clone() for k, v in state["shadow"].items()}
