"""Training targets, losses and metrics in plain PyTorch (no Lightning needed).

A :class:`ModelOutput` ties one model output (``"energy"``, ``"forces"``, ...)
to its target in the batch, a loss function, a loss weight and a set of
metrics. The total loss of a batch is ``sum_k weight_k * loss_k(pred_k, target_k)``.

Metrics accumulate sums over batches (so the epoch value is exact, not a mean
of batch means) and can be summed across processes before :meth:`Metric.compute`::

    mae = MeanAbsoluteError()
    for pred, target in pairs:
        mae.update(pred, target)
    mae.compute()   # mean |pred - target| over every element seen
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch
from torch.nn import functional as F

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def mse_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over all elements."""
    return F.mse_loss(pred, target)


def mae_loss(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over all elements."""
    return F.l1_loss(pred, target)


def huber_loss(pred: torch.Tensor, target: torch.Tensor, delta: float = 0.01) -> torch.Tensor:
    """Huber loss (quadratic below ``delta``, linear above) over all elements."""
    return F.huber_loss(pred, target, delta=delta)


LOSS_FUNCTIONS: dict[str, LossFn] = {"mse": mse_loss, "mae": mae_loss, "l1": mae_loss, "huber": huber_loss}


def loss_function(name: str) -> LossFn:
    """Loss function from its name (``mse``, ``mae``/``l1``, ``huber``)."""
    if name not in LOSS_FUNCTIONS:
        raise ValueError(f"unknown loss function {name!r}; choose one of {sorted(LOSS_FUNCTIONS)}")
    return LOSS_FUNCTIONS[name]


class Metric:
    """Accumulates a reduction over batches.

    State is a float64 tensor ``[sum, count]`` so that processes can add their
    states (:meth:`state` / :meth:`load_state`) before :meth:`compute`.
    """

    name = "metric"

    def __init__(self) -> None:
        self._state = torch.zeros(2, dtype=torch.float64)

    def reset(self) -> None:
        """Forget everything seen so far."""
        self._state = torch.zeros(2, dtype=torch.float64)

    def _terms(self, diff: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add one batch of predictions and targets (same shape)."""
        if pred.shape != target.shape:
            raise ValueError(f"{self.name}: prediction shape {tuple(pred.shape)} != target shape {tuple(target.shape)}")
        diff = (pred.detach() - target.detach()).to(torch.float64).cpu()
        self._state += torch.stack([self._terms(diff).sum(), torch.tensor(float(diff.numel()), dtype=torch.float64)])

    def state(self) -> torch.Tensor:
        """``[sum, count]`` accumulated so far (a copy)."""
        return self._state.clone()

    def load_state(self, state: torch.Tensor) -> None:
        """Replace the accumulated state, e.g. by the sum over all processes."""
        self._state = state.detach().to(torch.float64).cpu().clone()

    def compute(self) -> float:
        """The metric over everything seen since the last :meth:`reset` (nan if nothing)."""
        total, count = self._state.tolist()
        if count == 0:
            return math.nan
        return self._finish(total / count)

    def _finish(self, mean: float) -> float:
        return mean


class MeanAbsoluteError(Metric):
    """mean |pred - target| over all elements."""

    name = "mae"

    def _terms(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.abs()


class RootMeanSquaredError(Metric):
    """sqrt(mean (pred - target)^2) over all elements."""

    name = "rmse"

    def _terms(self, diff: torch.Tensor) -> torch.Tensor:
        return diff.square()

    def _finish(self, mean: float) -> float:
        return math.sqrt(mean)


METRICS: dict[str, type[Metric]] = {"mae": MeanAbsoluteError, "rmse": RootMeanSquaredError}


class ModelOutput:
    """One trained output: prediction ``name``, target ``target_name``, loss and metrics.

    Args:
        name: key of the model output (and by default of the target in the batch).
        loss_fn: callable ``(pred, target) -> scalar`` or a name from :data:`LOSS_FUNCTIONS`;
            ``None`` (or ``loss_weight=0``) monitors the output without training on it.
        loss_weight: factor of this output's loss in the total loss.
        metrics: names (``"mae"``, ``"rmse"``) of metrics to track.
        target_name: key of the target in the batch if it differs from ``name``.
    """

    def __init__(
        self,
        name: str,
        loss_fn: LossFn | str | None = "mse",
        loss_weight: float = 1.0,
        metrics: Iterable[str] = ("mae", "rmse"),
        target_name: str | None = None,
    ) -> None:
        if not name:
            raise ValueError("ModelOutput needs a non-empty name")
        if not math.isfinite(float(loss_weight)) or loss_weight < 0:
            raise ValueError(f"loss_weight of {name!r} must be a finite number >= 0, got {loss_weight!r}")
        self.name = name
        self.target_name = target_name or name
        self.loss_fn: LossFn | None = loss_function(loss_fn) if isinstance(loss_fn, str) else loss_fn
        self.loss_weight = float(loss_weight)
        self.metric_names = tuple(metrics)
        for m in self.metric_names:
            if m not in METRICS:
                raise ValueError(f"unknown metric {m!r} for output {name!r}; choose from {sorted(METRICS)}")
        # one set of accumulators per subset ("train", "val", "test")
        self._metrics: dict[str, dict[str, Metric]] = {}

    def __repr__(self) -> str:
        return f"ModelOutput({self.name!r}, weight={self.loss_weight}, metrics={self.metric_names})"

    @property
    def trains(self) -> bool:
        """True if this output contributes to the loss."""
        return self.loss_fn is not None and self.loss_weight > 0

    def loss(self, pred: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``loss_weight * loss_fn(pred[name], batch[target_name])`` (0 if not trained)."""
        if not self.trains:
            return torch.zeros((), dtype=pred[self.name].dtype, device=pred[self.name].device)
        p, t = self._pair(pred, batch)
        return self.loss_weight * self.loss_fn(p, t)

    def metrics(self, subset: str) -> dict[str, Metric]:
        """The metric accumulators of ``subset`` (created on first use)."""
        if subset not in self._metrics:
            self._metrics[subset] = {m: METRICS[m]() for m in self.metric_names}
        return self._metrics[subset]

    def update_metrics(self, pred: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], subset: str) -> None:
        """Add one batch to the metrics of ``subset``."""
        p, t = self._pair(pred, batch)
        for metric in self.metrics(subset).values():
            metric.update(p, t)

    def reset_metrics(self, subset: str) -> None:
        for metric in self.metrics(subset).values():
            metric.reset()

    def _pair(self, pred: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        if self.name not in pred:
            raise KeyError(f"the model did not return output {self.name!r} (it returned {sorted(pred)})")
        if self.target_name not in batch:
            raise KeyError(f"the batch has no target {self.target_name!r} for output {self.name!r}")
        p = pred[self.name]
        t = batch[self.target_name].to(p.dtype)
        if p.shape != t.shape:
            if p.numel() == t.numel():
                t = t.reshape(p.shape)
            else:
                raise ValueError(
                    f"output {self.name!r}: prediction shape {tuple(p.shape)} does not match target shape {tuple(t.shape)}"
                )
        return p, t


def total_loss(
    outputs: Iterable[ModelOutput], pred: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor]
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Weighted sum of the losses of ``outputs`` and the (weighted) loss of each."""
    parts: dict[str, torch.Tensor] = {}
    for out in outputs:
        if out.trains:
            parts[out.name] = out.loss(pred, batch)
    if not parts:
        raise ValueError("no output has a loss: give at least one ModelOutput a loss_fn and loss_weight > 0")
    total = torch.stack(list(parts.values())).sum()
    return total, parts
