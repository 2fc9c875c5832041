"""Datasets, transforms, batching and the Lightning data module of ``training``.

API (all names below are importable from ``training.data``)
-----------------------------------------------------------

Storage (:mod:`.atoms_db`)::

    ASEAtomsData(path, load_properties=None, property_units=None, distance_unit=None, transforms=())
        ds[i] -> dict of tensors for ONE system (keys from spkserve.keys):
            atomic_numbers [n] int64, positions [n,3], cell [1,3,3], pbc [1,3] bool,
            n_atoms [1] int64, "_idx" [1] int64 (row index), per-system properties [1,...]
            (energy [1], stress [1,3,3], dipole_moment [1,3]), per-atom ones [n,...] (forces [n,3]);
            float64 and converted to the requested units; transforms applied in order.
        ASEAtomsData.create(path, distance_unit, property_unit_dict, atomrefs=None, per_atom_properties=())
        .add_systems(atoms_list, property_list=None)   # from dicts or atoms.calc
        .subset(indices), .with_transforms(ts), .load_into_memory(), .validate(), .iter_raw(), .get_raw(i)
        .metadata, .update_metadata(distance_unit=, property_units=, atomrefs=, **extra)
        .available_properties, .load_properties, .property_units, .distance_unit,
        .atomrefs (dict name -> Tensor[max_z+1] in requested units), .fingerprint (sha256 of the file)
    AtomsDataError (ValueError): missing properties, bad shapes, NaN, unknown units, empty splits, cutoffs.

Importers (:mod:`.importers`; units of the FILE are stated by the user, stored as-is)::

    from_extxyz(path, db_path, energy_unit="eV", forces_unit=None, distance_unit="Ang", *, properties=None,
                property_map=None, extra_units=None, stress_unit=None, index=":", overwrite=False)
    from_trajectory(...)  /  from_ase_file(...)   # any ase.io format
    from_ase_db(path, db_path, energy_unit, forces_unit=None, distance_unit="Ang", *, properties=("energy","forces"),
                property_map=None, extra_units=None)   # e.g. SchNetPack .db files (values in row.data)
    from_npz(path, db_path, energy_unit, forces_unit=None, distance_unit="Ang", *, key_map=MD17_KEYS)
    from_atoms_list(frames, db_path, distance_unit, property_units, property_list=None, atomrefs=None)

Reference datasets (:mod:`.datasets`; AtomsDataModule subclasses; ``prepare_data()`` downloads and converts)::

    MD17(datapath, molecule, batch_size, num_train, num_val, num_test=None, *, raw_dir=None, download=True,
         fetch=None, **AtomsDataModule_kwargs)                 # kcal/mol, kcal/mol/Ang as published
    RMD17(datapath, molecule, ..., split_index=None)           # split_index 1..5: official splits
    MD22(datapath, molecule, ...)
    QM9(datapath, batch_size, ..., remove_uncharacterized=True)  # Hartree etc., atomrefs in metadata
    ISO17(datapath, batch_size, ..., fold="reference")         # eV, eV/Ang
    (property names of QM9: QM9.U0 = "energy_U0", QM9.homo, ... see QM9.PROPERTIES)

Transforms (:mod:`.transforms`; ``sample -> new sample``, never modify the input)::

    NeighborList(cutoff, backend="vesin", cache_dir=None, cache_in_memory=True, fingerprint=None)
        .precompute(samples) fills the memory cache with batched calls (the data module does this at setup)
    RemoveOffsets(property="energy", remove_mean=True, remove_atomrefs=True, is_extensive=True,
                  atomref=None, mean_per_atom=None)   # fitted on the train split by AtomsDataModule
    AddOffsets(...same...), AddOffsets.from_remove(remove)   # inverse; also works on batches
    CastTo32(), CastTo64(), SubtractCenterOfMass(), WrapPositions(), ScaleProperty(property, factor)
    Transform: optional base class; ``deterministic = True`` (all of the above) allows caching the output,
    plain callables and random augmentations are never cached.

Batching (:mod:`.collate`)::

    collate_atoms(samples) -> batch dict (concatenated; system_index [N]; pair_i/pair_j shifted by atom offsets;
                              per-system properties stacked [S,...]; "_idx" [S])

Data module (:mod:`.datamodule`)::

    AtomsDataModule(datapath, batch_size, num_train, num_val, num_test=None, split_file=None,
                    split_mode="random"|"blocks", transforms=(), train_transforms=None, val_transforms=None,
                    test_transforms=None, property_units=None, distance_unit=None, num_workers=0,
                    pin_memory=False, seed=0, val_batch_size=None, *, load_properties=None, split_gap=0,
                    in_memory=True, validate=True, test_batch_size=None, precompute_neighbors=None,
                    cache_samples=None)
        in_memory: whole db read once at setup; precompute_neighbors (default in_memory): NeighborList
        caches filled at setup with batched calls; cache_samples (default in_memory): transformed samples
        kept after first use when every transform has ``deterministic = True``.
        .setup() -> .train_dataset/.val_dataset/.test_dataset, .train_idx/.val_idx/.test_idx
        .get_offsets("energy") -> (atomref Tensor[max_z+1] float64, mean_per_atom float)   # train split;
                                  exactly what the RemoveOffsets transform removes (zeros for parts switched off)
        .get_offset_transform("energy") -> fitted RemoveOffsets | None  (AddOffsets.from_remove(t) inverts it)
        .get_stats(property, divide_by_atoms=False, remove_offsets=False) -> (mean, std) tensors
        .fingerprint (sha256 of db bytes + split), .max_z, .dataset (the full ASEAtomsData)
        .train_dataloader() / .val_dataloader() / .test_dataloader()   (collate_atoms)

Statistics (:mod:`.stats`): ``fit_offsets(dataset, property, ...)``, ``property_stats(...)``.
Splits (:mod:`.splits`): ``make_split``, ``save_split``, ``load_split``.
"""

from .atoms_db import IDX, ASEAtomsData, AtomsDataError
from .collate import collate_atoms
from .importers import (
    MD17_KEYS,
    RMD17_KEYS,
    from_ase_db,
    from_ase_file,
    from_atoms_list,
    from_extxyz,
    from_npz,
    from_trajectory,
)
from .splits import load_split, make_split, save_split
from .stats import fit_offsets, property_stats
from .transforms import (
    AddOffsets,
    CastTo32,
    CastTo64,
    NeighborList,
    RemoveOffsets,
    ScaleProperty,
    SubtractCenterOfMass,
    Transform,
    WrapPositions,
)

__all__ = [
    "ISO17", "MD17", "MD22", "QM9", "RMD17", "DownloadError", "ReferenceDataset", "download_file",
    "IDX", "ASEAtomsData", "AtomsDataError", "collate_atoms", "AtomsDataModule",
    "MD17_KEYS", "RMD17_KEYS", "from_ase_db", "from_ase_file", "from_atoms_list", "from_extxyz", "from_npz",
    "from_trajectory", "load_split", "make_split", "save_split", "fit_offsets", "property_stats",
    "AddOffsets", "CastTo32", "CastTo64", "NeighborList", "RemoveOffsets", "ScaleProperty",
    "SubtractCenterOfMass", "Transform", "WrapPositions",
]


# the data module and the datasets need pytorch-lightning, whose import takes seconds: load them on first use
_LAZY = {
    "AtomsDataModule": ".datamodule",
    **{name: ".datasets" for name in ("ISO17", "MD17", "MD22", "QM9", "RMD17", "DownloadError",
                                      "ReferenceDataset", "download_file")},
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
