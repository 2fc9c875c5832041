"""Lightning data module: one database, three splits, per-split transforms, fitted offsets."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader

from spkserve import keys

from .atoms_db import IDX, ASEAtomsData, AtomsDataError, Transform
from .collate import collate_atoms
from .splits import check_split_sizes, load_split, make_split, save_split
from .stats import fit_offsets, property_stats
from .transforms import NeighborList, RemoveOffsets, check_cutoff


class AtomsDataModule(pl.LightningDataModule):
    """Splits an :class:`ASEAtomsData` database and serves batches (:func:`collate_atoms`).

    Args:
        datapath: the ASE database (``.db``).
        batch_size: training batch size (``val_batch_size`` defaults to it).
        num_train, num_val, num_test: counts (int) or fractions (float in (0, 1]);
            ``num_test=None`` takes the rest.
        split_file: npz with ``train_idx``/``val_idx``/``test_idx``; reused if it
            exists, written otherwise.
        split_mode: ``"random"`` or ``"blocks"`` (contiguous time blocks train | val | test,
            separated by ``split_gap`` skipped frames).
        transforms: applied to every split unless ``train_transforms`` /
            ``val_transforms`` / ``test_transforms`` replace them for that split.
        property_units, distance_unit, load_properties: as in :class:`ASEAtomsData`.
        num_workers, pin_memory: DataLoader settings (workers persist between epochs).
        seed: seed of the random split.
        in_memory: read the whole database into memory once at setup (fast epochs).
        precompute_neighbors: compute the lists of every :class:`NeighborList` transform at
            setup in batched calls (default: ``in_memory``); they are then served from memory.
        cache_samples: keep transformed samples in memory after their first use, when every
            transform is ``deterministic`` (default: ``in_memory``); later epochs only collate.
        validate: check every row (missing properties, shapes, NaN) at setup.

    After :meth:`setup`: ``train_dataset``, ``val_dataset``, ``test_dataset``,
    :meth:`get_offsets`, :meth:`get_stats`, :attr:`fingerprint`. Every
    :class:`RemoveOffsets` in the transforms is replaced by a copy fitted on
    the training split.
    """

    def __init__(
        self,
        datapath: str | os.PathLike,
        batch_size: int,
        num_train: int | float,
        num_val: int | float,
        num_test: int | float | None = None,
        split_file: str | os.PathLike | None = None,
        split_mode: str = "random",
        transforms: Sequence[Transform] = (),
        train_transforms: Sequence[Transform] | None = None,
        val_transforms: Sequence[Transform] | None = None,
        test_transforms: Sequence[Transform] | None = None,
        property_units: Mapping[str, str] | None = None,
        distance_unit: str | None = None,
        num_workers: int = 0,
        pin_memory: bool = False,
        seed: int = 0,
        val_batch_size: int | None = None,
        *,
        load_properties: Sequence[str] | None = None,
        split_gap: int = 0,
        in_memory: bool = True,
        validate: bool = True,
        test_batch_size: int | None = None,
        precompute_neighbors: bool | None = None,
        cache_samples: bool | None = None,
    ) -> None:
        super().__init__()
        if int(batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if split_mode not in ("random", "blocks"):
            raise AtomsDataError(f"split_mode must be 'random' or 'blocks', got {split_mode!r}")
        self.datapath = Path(datapath)
        self.batch_size = int(batch_size)
        self.val_batch_size = int(val_batch_size or batch_size)
        self.test_batch_size = int(test_batch_size or self.val_batch_size)
        self.num_train, self.num_val, self.num_test = num_train, num_val, num_test
        self.split_file = None if split_file is None else Path(split_file)
        self.split_mode = split_mode
        self.split_gap = int(split_gap)
        self.transforms = list(transforms)
        self._split_transforms = {
            "train": None if train_transforms is None else list(train_transforms),
            "val": None if val_transforms is None else list(val_transforms),
            "test": None if test_transforms is None else list(test_transforms),
        }
        self.property_units = dict(property_units or {})
        self.distance_unit = distance_unit
        self.load_properties = None if load_properties is None else list(load_properties)
        self.num_workers = int(num_workers)
        self.pin_memory = bool(pin_memory)
        self.seed = int(seed)
        self.in_memory = in_memory
        self.validate = validate
        self.precompute_neighbors = in_memory if precompute_neighbors is None else precompute_neighbors
        self.cache_samples = in_memory if cache_samples is None else cache_samples
        self.dataset: ASEAtomsData | None = None
        self.train_idx = self.val_idx = self.test_idx = None
        self.train_dataset = self.val_dataset = self.test_dataset = None
        self._offsets: dict[tuple, tuple[torch.Tensor | None, float | None]] = {}
        self._fingerprint: str | None = None
        self._max_z: int | None = None

    # --- lifecycle -----------------------------------------------------------------
    def prepare_data(self) -> None:
        """Nothing to download for a plain database (subclasses fetch theirs here)."""
        if not self.datapath.exists():
            raise FileNotFoundError(f"dataset {self.datapath} does not exist")

    def setup(self, stage: str | None = None) -> None:
        """Open, validate and split the data; fit offsets on the training split (idempotent)."""
        if self.train_dataset is not None:
            return
        self.prepare_data()
        ds = ASEAtomsData(
            self.datapath,
            load_properties=self.load_properties,
            property_units=self.property_units,
            distance_unit=self.distance_unit,
        )
        if len(ds) == 0:
            raise AtomsDataError(f"dataset {self.datapath} is empty")
        if self.in_memory:
            ds.load_into_memory()
        if self.validate:
            ds.validate()
        self.dataset = ds
        split = None
        if self.split_file is not None and self.split_file.exists():
            split = load_split(self.split_file, len(ds))
            check_split_sizes(self.split_file, split, len(ds), self.num_train, self.num_val)
        if split is None:
            split = make_split(
                len(ds), self.num_train, self.num_val, self.num_test, self.split_mode, self.seed, self.split_gap
            )
            if self.split_file is not None:
                save_split(self.split_file, split)
        self.train_idx, self.val_idx, self.test_idx = split
        self._max_z = max(int(s[keys.Z].max()) for s in ds.iter_raw())
        train_raw = ds.subset(self.train_idx)
        fp = ds.fingerprint  # neighbor-list disk caches are keyed by the database content, not the split
        built: dict[int, Transform] = {}  # one fitted copy per original transform object

        def prepare(ts: Sequence[Transform]) -> list[Transform]:
            out = []
            for t in ts:
                if id(t) not in built:
                    built[id(t)] = self._prepare_transform(t, train_raw, fp)
                out.append(built[id(t)])
            return out

        lists = {k: prepare(v if v is not None else self.transforms) for k, v in self._split_transforms.items()}
        self.train_dataset = ds.subset(self.train_idx).with_transforms(lists["train"])
        self.val_dataset = ds.subset(self.val_idx).with_transforms(lists["val"])
        self.test_dataset = ds.subset(self.test_idx).with_transforms(lists["test"])
        if self.precompute_neighbors:
            self._precompute_neighbors()
        else:
            self._check_cutoffs()
        if self.cache_samples:
            for d in (self.train_dataset, self.val_dataset, self.test_dataset):
                d.cache_transformed()
        self._check_first_samples()

    def _check_cutoffs(self) -> None:
        """Refuse degenerate periodic cells for the largest NeighborList cutoff before training."""
        cutoffs = [t.cutoff for d in (self.train_dataset, self.val_dataset, self.test_dataset)
                   for t in d.transforms if isinstance(t, NeighborList)]
        if not cutoffs:
            return
        cutoff = max(cutoffs)
        for s in self.dataset.iter_raw():
            pbc = s[keys.pbc].reshape(3).numpy()
            if pbc.any():
                check_cutoff(s[keys.cell].reshape(3, 3).numpy(), pbc, cutoff, f"{self.datapath.name} row {int(s[IDX][0])}")

    def _precompute_neighbors(self) -> None:
        """Fill the in-memory caches of every NeighborList with batched calls (static datasets)."""
        for ds in (self.train_dataset, self.val_dataset, self.test_dataset):
            for k, t in enumerate(ds.transforms):
                if isinstance(t, NeighborList) and t.cache_in_memory:
                    prefix = ds.transforms[:k]
                    t.precompute(_apply(prefix, ds.get_raw(i)) for i in range(len(ds)))

    def _prepare_transform(self, t: Transform, train_raw: ASEAtomsData, fp: str) -> Transform:
        if isinstance(t, RemoveOffsets) and not t.is_fitted:
            ref, mean = self._fit(t.property, t.remove_atomrefs, t.remove_mean, t.is_extensive, train_raw)
            return t.fitted(ref, mean)
        if isinstance(t, NeighborList) and t.cache_dir is not None and t.fingerprint is None:
            return t.with_fingerprint(fp)
        return t

    def _fit(self, prop, remove_atomrefs, remove_mean, is_extensive, train_raw=None):
        key = (prop, remove_atomrefs, remove_mean, is_extensive)
        if key not in self._offsets:
            if prop not in self.dataset.load_properties:
                raise AtomsDataError(
                    f"RemoveOffsets: property {prop!r} is not in the dataset (loaded: {self.dataset.load_properties})"
                )
            train_raw = train_raw if train_raw is not None else self.dataset.subset(self.train_idx)
            self._offsets[key] = fit_offsets(
                train_raw, prop, remove_atomrefs, remove_mean, is_extensive,
                atomref=self.dataset.atomrefs.get(prop), max_z=self._max_z,
            )
        return self._offsets[key]

    def _check_first_samples(self) -> None:
        """Run the transforms on one sample per split so that problems appear before training."""
        for name in ("train", "val", "test"):
            ds = getattr(self, f"{name}_dataset")
            if len(ds):
                try:
                    ds[0]
                except Exception as err:
                    err.add_note(f"(raised by the transforms on the first sample of the {name} split)")
                    raise

    def _require_setup(self) -> None:
        if self.train_dataset is None:
            raise RuntimeError("call setup() first")

    # --- statistics ----------------------------------------------------------------
    def get_offsets(
        self, property: str = keys.energy, remove_atomrefs: bool | None = None, remove_mean: bool | None = None,
        is_extensive: bool | None = None,
    ) -> tuple[torch.Tensor, float]:
        """``(atomref [max_z+1] float64, mean_per_atom)`` of ``property`` fitted on the training split.

        Without flags, the statistics of the training split's
        :class:`RemoveOffsets` transform for ``property`` are returned (exactly
        what was removed from the targets); with no such transform, or with
        explicit flags, they are fitted with those flags (default all True).
        Uses the database's atomrefs if it has them for ``property``, else a
        least-squares fit on composition. Parts switched off are zeros.
        """
        self._require_setup()
        if remove_atomrefs is None and remove_mean is None and is_extensive is None:
            t = self.get_offset_transform(property)
            if t is not None:
                ref = t.atomref if t.remove_atomrefs else None
                mean = t.mean_per_atom if t.remove_mean else None
                return self._pad_offsets(ref, mean)
        flags = [True if f is None else f for f in (remove_atomrefs, remove_mean, is_extensive)]
        return self._pad_offsets(*self._fit(property, *flags))

    def _pad_offsets(self, ref, mean) -> tuple[torch.Tensor, float]:
        if ref is None:
            ref = torch.zeros(self._max_z + 1, dtype=torch.float64)
        return ref, (0.0 if mean is None else float(mean))

    def get_offset_transform(self, property: str = keys.energy) -> RemoveOffsets | None:
        """The fitted :class:`RemoveOffsets` of the training split for ``property`` (None if there is none);
        ``AddOffsets.from_remove(t)`` is its inverse (e.g. for model outputs)."""
        self._require_setup()
        for t in self.train_dataset.transforms:
            if isinstance(t, RemoveOffsets) and t.property == property:
                return t
        return None

    def get_stats(
        self, property: str, divide_by_atoms: bool = False, remove_offsets: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std) of ``property`` on the training split (float64 tensors).

        Per-atom properties: over all atoms and samples. Per-system: optionally
        after removing the fitted offsets, optionally divided by the atom count.
        """
        self._require_setup()
        offsets = self._fit(property, True, True, True) if remove_offsets else None
        return property_stats(self.dataset.subset(self.train_idx), property, divide_by_atoms, offsets)

    @property
    def fingerprint(self) -> str:
        """sha256 over the database bytes and the split indices (provenance of a trained model)."""
        if self.train_idx is None:
            raise RuntimeError("call setup() first")
        if self._fingerprint is None:
            h = hashlib.sha256()
            h.update(self.dataset.fingerprint.encode())
            for idx in (self.train_idx, self.val_idx, self.test_idx):
                h.update(np.asarray(idx, dtype=np.int64).tobytes())
                h.update(b"|")
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    @property
    def max_z(self) -> int:
        self._require_setup()
        return self._max_z

    # --- loaders -------------------------------------------------------------------
    def _loader(self, dataset, batch_size: int, shuffle: bool) -> DataLoader:
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            collate_fn=collate_atoms,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
            persistent_workers=self.num_workers > 0,
            generator=torch.Generator().manual_seed(self.seed) if shuffle else None,
        )

    def train_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.train_dataset, self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        self._require_setup()
        return self._loader(self.val_dataset, self.val_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        self._require_setup()
        if len(self.test_dataset) == 0:
            raise AtomsDataError("the test split is empty (num_test=0 or the split file has no test_idx)")
        return self._loader(self.test_dataset, self.test_batch_size, shuffle=False)

    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()


def _apply(transforms: Sequence[Transform], sample):
    for t in transforms:
        sample = t(sample)
    return sample
