"""Lightning adapter: optimisation, EMA, logging. The physics lives in the model and :mod:`training.losses`.

:class:`AtomisticTask` wraps an :class:`spkserve.model.AtomisticModel` and a list
of :class:`~training.losses.ModelOutput`. It

* trains on the weighted sum of the output losses (forces by autograd with
  ``create_graph=True``),
* validates/tests with gradients enabled (forces need them) on the EMA weights
  if ``ema_decay`` is set,
* uses AdamW by default, a linear learning-rate warm-up over ``warmup_steps``
  optimizer steps, then ReduceLROnPlateau on ``val_loss`` (or cosine / none),
* logs ``{subset}_loss`` and ``{subset}_{output}_{mae,rmse}`` per epoch, summed
  exactly over all processes under DDP.

Energy offsets: the data module removes per-element references and a mean
energy per atom from the energy targets (:class:`training.data.RemoveOffsets`),
and the model adds them back in eval mode only. So in training mode the raw
model output is compared with the offset-free targets, and in validation/test
(eval mode) the offsets are added back to the targets before comparing:
validation measures exactly the model that gets exported.
"""

from __future__ import annotations

import math
from typing import Any, Sequence

import pytorch_lightning as pl
import torch
from torch import nn

from spkserve import keys
from training.ema import ExponentialMovingAverage
from training.losses import ModelOutput, total_loss

OPTIMIZERS = {"adamw": torch.optim.AdamW, "adam": torch.optim.Adam, "sgd": torch.optim.SGD}


class AtomisticTask(pl.LightningModule):
    """Train ``model`` on ``outputs``.

    Args:
        model: the model; called as ``model(batch, properties=[...])``.
        outputs: the trained/monitored outputs.
        optimizer: ``"adamw"`` (default), ``"adam"`` or ``"sgd"``.
        lr: peak learning rate (after warm-up).
        optimizer_args: extra keyword arguments of the optimizer (e.g. ``weight_decay``).
        scheduler: ``"plateau"`` (ReduceLROnPlateau on ``monitor``), ``"cosine"`` (per
            step, from ``lr`` after warm-up to ``min_lr`` at the last step, or at the
            end of the trainer's ``max_time`` if that comes first) or ``"none"``.
        scheduler_args: for plateau: ``factor``, ``patience``, ``min_lr``, ``threshold``;
            for cosine: ``min_lr``.
        warmup_steps: optimizer steps of linear learning-rate warm-up from ~0 to ``lr``.
        ema_decay: decay of the exponential moving average of the weights; None = no EMA.
        monitor: the logged quantity the plateau scheduler watches.
        energy_offsets: ``(atomref [max_z+1], mean_per_atom)`` that the model adds
            in eval mode (see module docstring); None if the targets carry none.
        energy_key: the output the offsets belong to.
        compile: run the training forward pass (energy, and forces/stress by
            ``torch.func.grad``, i.e. :meth:`~spkserve.model.AtomisticModel.forward_functional`)
            through ``torch.compile`` with dynamic shapes; the backward of the whole
            graph is then compiled too. The first step compiles (about a minute);
            afterwards a PaiNN ethanol step is ~15 % faster (``benchmarks/training.py
            --compile``). Validation stays eager. Needs a model with that method.
        compile_backend: the ``torch.compile`` backend (``inductor``; tests use ``aot_eager``).
    """

    def __init__(
        self,
        model: nn.Module,
        outputs: Sequence[ModelOutput],
        optimizer: str = "adamw",
        lr: float = 5e-4,
        optimizer_args: dict[str, Any] | None = None,
        scheduler: str = "plateau",
        scheduler_args: dict[str, Any] | None = None,
        warmup_steps: int = 0,
        ema_decay: float | None = None,
        monitor: str = "val_loss",
        energy_offsets: tuple[torch.Tensor, float] | None = None,
        energy_key: str = keys.energy,
        compile: bool = False,
        compile_backend: str = "inductor",
    ) -> None:
        super().__init__()
        if compile and not hasattr(model, "forward_functional"):
            raise ValueError(f"compile=True needs a model with forward_functional; {type(model).__name__} has none")
        self.compile_model = bool(compile)
        self.compile_backend = compile_backend
        self._compiled_forward = None
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {sorted(OPTIMIZERS)}")
        if scheduler not in ("plateau", "cosine", "none", None):
            raise ValueError(f"unknown scheduler {scheduler!r}; choose 'plateau', 'cosine' or 'none'")
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr!r}")
        if not outputs:
            raise ValueError("AtomisticTask needs at least one ModelOutput")
        self.model = model
        self.outputs = list(outputs)
        if not any(o.trains for o in self.outputs):
            raise ValueError("no output has a loss: give at least one output a loss_weight > 0")
        self.properties = tuple(dict.fromkeys(o.name for o in self.outputs))
        self.optimizer_name = optimizer
        self.lr = float(lr)
        self.optimizer_args = dict(optimizer_args or {})
        self.scheduler_name = scheduler or "none"
        self.scheduler_args = dict(scheduler_args or {})
        self.warmup_steps = int(warmup_steps)
        self.monitor = monitor
        self.energy_key = energy_key
        self.ema = ExponentialMovingAverage(model, ema_decay) if ema_decay else None
        self._ema_backup: dict[str, torch.Tensor] | None = None
        if energy_offsets is not None:
            atomref, mean_per_atom = energy_offsets
            self.register_buffer("offset_atomref", torch.as_tensor(atomref, dtype=torch.float64).clone())
            self.offset_mean_per_atom = float(mean_per_atom)
        else:
            self.offset_atomref = None
            self.offset_mean_per_atom = 0.0

    # ------------------------------------------------------------------ steps
    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return self.model(batch, properties=self.properties)

    def _targets_with_offsets(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Targets in the frame of the eval-mode model (offsets added back)."""
        if self.offset_atomref is None or self.energy_key not in batch:
            return batch
        batch = dict(batch)
        z = batch[keys.Z]
        per_atom = self.offset_atomref[z] + self.offset_mean_per_atom  # [N]
        n_sys = batch[keys.n_atoms].shape[0]
        per_sys = torch.zeros(n_sys, dtype=per_atom.dtype, device=per_atom.device).index_add_(0, batch[keys.idx_m], per_atom)
        target = batch[self.energy_key]
        batch[self.energy_key] = (target.to(torch.float64) + per_sys.reshape(target.shape)).to(target.dtype)
        return batch

    def _n_systems(self, batch: dict[str, torch.Tensor]) -> int:
        return int(batch[keys.n_atoms].shape[0])

    def _training_forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        if not self.compile_model:
            return self.model(batch, properties=self.properties)
        if self._compiled_forward is None:
            self._compiled_forward = torch.compile(
                self.model.forward_functional, dynamic=True, backend=self.compile_backend
            )
        return self._compiled_forward(batch, self.properties)

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pred = self._training_forward(batch)
        loss, parts = total_loss(self.outputs, pred, batch)
        n = self._n_systems(batch)
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, batch_size=n, sync_dist=False)
        for out in self.outputs:
            out.update_metrics(pred, batch, "train")
        return loss

    def _eval_step(self, batch: dict[str, torch.Tensor], subset: str) -> torch.Tensor:
        with torch.enable_grad():
            pred = self.model(batch, properties=self.properties)
        pred = {k: v.detach() for k, v in pred.items()}
        batch = self._targets_with_offsets(batch)
        loss, _ = total_loss(self.outputs, pred, batch)
        self.log(f"{subset}_loss", loss, on_step=False, on_epoch=True, prog_bar=True,
                 batch_size=self._n_systems(batch), sync_dist=True)
        for out in self.outputs:
            out.update_metrics(pred, batch, subset)
        return loss

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "val")

    def test_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._eval_step(batch, "test")

    # ------------------------------------------------------------- metrics
    def _log_metrics(self, subset: str) -> None:
        for out in self.outputs:
            for name, metric in out.metrics(subset).items():
                state = metric.state().to(self.device)
                if self.trainer is not None and self.trainer.world_size > 1:
                    state = self.trainer.strategy.reduce(state, reduce_op="sum")
                metric.load_state(state)
                value = metric.compute()
                if not math.isnan(value):
                    self.log(f"{subset}_{out.name}_{name}", value, prog_bar=(subset == "val" and name == "mae"),
                             sync_dist=False, rank_zero_only=False)
            out.reset_metrics(subset)

    def on_train_epoch_start(self) -> None:
        for out in self.outputs:
            out.reset_metrics("train")

    def on_train_epoch_end(self) -> None:
        self._log_metrics("train")

    def on_validation_epoch_start(self) -> None:
        for out in self.outputs:
            out.reset_metrics("val")
        self._swap_in_ema()

    def on_validation_epoch_end(self) -> None:
        self._log_metrics("val")
        self._swap_out_ema()

    def on_test_epoch_start(self) -> None:
        for out in self.outputs:
            out.reset_metrics("test")
        self._swap_in_ema()

    def on_test_epoch_end(self) -> None:
        self._log_metrics("test")
        self._swap_out_ema()

    # ----------------------------------------------------------------- EMA
    def _swap_in_ema(self) -> None:
        if self.ema is None or self._ema_backup is not None:
            return
        state = self.model.state_dict()
        self._ema_backup = {k: state[k].detach().clone() for k in self.ema.shadow}
        self.ema.copy_to(self.model)

    def _swap_out_ema(self) -> None:
        if self._ema_backup is None:
            return
        state = self.model.state_dict()
        with torch.no_grad():
            for k, v in self._ema_backup.items():
                state[k].copy_(v)
        self._ema_backup = None

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.ema is not None:
            self.ema.update(self.model)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None:
            checkpoint["ema"] = self.ema.state_dict()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        if self.ema is not None and "ema" in checkpoint:
            self.ema.load_state_dict(checkpoint["ema"])

    def export_state_dict(self) -> dict[str, torch.Tensor]:
        """Weights to export: the EMA average if EMA is on, else the raw weights."""
        state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        if self.ema is not None:
            state.update({k: v.detach().clone() for k, v in self.ema.shadow.items()})
        return state

    # ---------------------------------------------------------- optimizers
    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        if self.scheduler_name != "cosine" and self.warmup_steps > 0 and self.global_step < self.warmup_steps:
            frac = (self.global_step + 1) / self.warmup_steps
            for opt in self.trainer.optimizers:
                for group in opt.param_groups:
                    group["lr"] = self.lr * frac

    def configure_optimizers(self) -> Any:
        opt = OPTIMIZERS[self.optimizer_name](self.model.parameters(), lr=self.lr, **self.optimizer_args)
        if self.scheduler_name == "none":
            return opt
        args = dict(self.scheduler_args)
        if self.scheduler_name == "plateau":
            sched = torch.optim.lr_scheduler.ReduceLROnPlateau(
                opt,
                mode="min",
                factor=float(args.pop("factor", 0.5)),
                patience=int(args.pop("patience", 10)),
                min_lr=float(args.pop("min_lr", 1e-6)),
                threshold=float(args.pop("threshold", 1e-4)),
            )
            if args:
                raise ValueError(f"unknown plateau scheduler arguments {sorted(args)}")
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": self.monitor, "interval": "epoch"}}
        min_factor = float(args.pop("min_lr", 1e-6)) / self.lr
        for plateau_only in ("factor", "patience", "threshold"):  # shared config block; unused here
            args.pop(plateau_only, None)
        if args:
            raise ValueError(f"unknown cosine scheduler arguments {sorted(args)}")
        total = max(1, int(self.trainer.estimated_stepping_batches)) if self.trainer is not None else 1000
        warm = self.warmup_steps

        def factor(step: int) -> float:
            if warm > 0 and step < warm:
                return (step + 1) / warm
            progress = min(1.0, max((step - warm) / max(1, total - warm), self._time_progress()))
            return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def _time_progress(self) -> float:
        """Fraction of the trainer's ``max_time`` used so far (0 without a time limit).

        The cosine schedule follows whichever runs out first, steps or time, so a
        run stopped by ``max_time`` still ends with a fully decayed learning rate.
        """
        trainer = self._trainer
        if trainer is None:
            return 0.0
        from pytorch_lightning.callbacks import Timer

        timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
        if timer is None:
            return 0.0
        elapsed = timer.time_elapsed("train")
        remaining = timer.time_remaining("train")
        if remaining is None or elapsed + remaining <= 0:
            return 0.0
        return min(1.0, elapsed / (elapsed + remaining))
