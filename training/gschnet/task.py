"""cG-SchNet loss (pure PyTorch) and its Lightning adapter.

Loss of a batch of steps = mean over steps of the negative log-likelihood of the next
type (stop included) + mean over (non-stop step, prediction neighbour) pairs of the
cross entropy between the predicted distance distribution and a Gaussian-smeared target
(width ``distance_target_width_angstrom``, default one bin) centred on the true distance.
"""

from __future__ import annotations

from typing import Any

import pytorch_lightning as pl
import torch

from spkserve import keys
from spkserve.nn.gschnet import (
    LOG_P_DISTANCE,
    LOG_P_TYPE,
    NEXT_Z,
    PRED_IDX_J,
    PRED_IDX_M,
    STOP_TYPE,
    ConditionalGenerativeSchNet,
)
from training.gschnet.sequences import NEXT_POSITIONS


def distance_targets(model: ConditionalGenerativeSchNet, batch: dict[str, torch.Tensor],
                     width: float | None = None) -> torch.Tensor:
    """Soft targets over the distance bins for each (non-stop step, prediction neighbour).  [Q', n_bins]"""
    pred_m = batch[PRED_IDX_M]
    keep = (batch[NEXT_Z].index_select(0, pred_m) != STOP_TYPE).nonzero().squeeze(1)
    node = batch[keys.R].index_select(0, batch[PRED_IDX_J].index_select(0, keep))
    nxt = batch[NEXT_POSITIONS].to(node.dtype).index_select(0, pred_m.index_select(0, keep))
    d = torch.linalg.vector_norm(nxt - node, dim=-1).clamp(max=model.distance_max)  # [Q']
    w = width or model.bin_width
    t = torch.exp(-0.5 * ((model.bin_centers.to(d.dtype)[None] - d[:, None]) / w) ** 2)
    return t / t.sum(-1, keepdim=True)


def gschnet_loss(model: ConditionalGenerativeSchNet, batch: dict[str, torch.Tensor],
                 width: float | None = None) -> dict[str, torch.Tensor]:
    """``{"loss", "type_nll", "distance_ce"}`` of one batch (see module docstring)."""
    out = model(batch)
    cls = model.type_to_class[batch[NEXT_Z]]
    if bool((cls < 0).any()):
        bad = sorted(set(batch[NEXT_Z][cls < 0].tolist()))
        raise ValueError(f"next-atom types {bad} are not among the model's atom types {model.atom_types}")
    type_nll = torch.nn.functional.nll_loss(out[LOG_P_TYPE], cls)
    logd = out[LOG_P_DISTANCE]
    if logd.shape[0]:
        dist_ce = -(distance_targets(model, batch, width) * logd).sum(-1).mean()
    else:
        dist_ce = logd.sum() * 0.0
    return {"loss": type_nll + dist_ce, "type_nll": type_nll, "distance_ce": dist_ce}


class GenerativeTask(pl.LightningModule):
    """Lightning adapter: AdamW, ReduceLROnPlateau on ``val_loss``, logging of the loss parts."""

    def __init__(self, model: ConditionalGenerativeSchNet, lr: float = 5e-4, weight_decay: float = 0.0,
                 scheduler_patience: int = 10, scheduler_factor: float = 0.5, min_lr: float = 1e-6,
                 distance_target_width_angstrom: float | None = None):
        super().__init__()
        if not lr > 0:
            raise ValueError(f"learning rate must be > 0, got {lr}")
        self.model = model
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.scheduler_patience = int(scheduler_patience)
        self.scheduler_factor = float(scheduler_factor)
        self.min_lr = float(min_lr)
        self.width = distance_target_width_angstrom

    def _step(self, batch: dict[str, torch.Tensor], subset: str) -> torch.Tensor:
        parts = gschnet_loss(self.model, batch, self.width)
        n = int(batch[keys.n_atoms].shape[0])
        for k, v in parts.items():
            name = f"{subset}_loss" if k == "loss" else f"{subset}_{k}"
            self.log(name, v.detach(), batch_size=n, on_step=False, on_epoch=True, prog_bar=(k == "loss"))
        return parts["loss"]

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    def validation_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        return self._step(batch, "val")

    def configure_optimizers(self) -> Any:
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.lr, weight_decay=self.weight_decay)
        sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=self.scheduler_factor,
                                                           patience=self.scheduler_patience, min_lr=self.min_lr)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "monitor": "val_loss", "interval": "epoch"}}
