"""Evaluate a bundle on structures: neighbor list, unit conversion, species checks.

:class:`ModelRunner` is the local :class:`~spkserve.provider.ForceProvider`
every front end uses (ASE calculators, the MD engine, the servers). It takes
structures in Å and returns results in provider units (Å, eV, eV/Å, eV/Å³),
converting from the bundle's own units with :mod:`spkserve.units`.
"""

from __future__ import annotations

import functools
import os
import warnings
from typing import Sequence

import torch

from spkserve import keys, units
from spkserve.batch import Structure, collate
from spkserve.bundle import BundleError, LoadedBundle, load_bundle, parse_dtype
from spkserve.neighbors import neighbor_list
from spkserve.provider import PROVIDER_UNITS, ProviderError


#: with ``compile=True``, batches with fewer pairs than this run compiled (see ModelRunner)
SMALL_PAIRS = 4096


def _is_compiler_error(err: Exception) -> bool:
    mod = type(err).__module__
    return mod.startswith(("torch._dynamo", "torch._inductor")) or "CppCompileError" in type(err).__name__


def _plain_neighbors(positions, cell, pbc, n_atoms, cutoff, backend):
    return neighbor_list(positions, cell, pbc, n_atoms, cutoff, backend=backend)


class ModelRunner:
    """Run a bundle on batches of structures (a :class:`ForceProvider`).

    Args:
        bundle: a :class:`LoadedBundle` or the path of a bundle file.
        dtype: evaluate in float32/float64 (default: as stored in the bundle).
        device: torch device.
        skin_angstrom: Verlet skin of the neighbor list (0 rebuilds every call).
        neighbor_backend: neighbor-list backend (see :mod:`spkserve.neighbors`).
        compile: run small batches (fewer than :data:`SMALL_PAIRS` pairs) through
            ``torch.compile`` of the model's functional energy+forces graph (inductor,
            dynamic pair and atom counts, C++ wrapper, single-threaded kernels). The
            first call compiles (10-40 s); afterwards a small molecule's call is 2-3x
            faster than eager (``benchmarks/results/md.md``). Larger batches stay on the
            eager path, whose fused, memory-lean kernels beat the compiled graph there
            (75 vs 180 ms for a 192-atom water SchNet step). If compilation fails (no
            C++ compiler, unsupported operation) the runner warns once and continues
            eagerly.
    """

    def __init__(
        self,
        bundle: LoadedBundle | str | os.PathLike,
        dtype: str | torch.dtype | None = None,
        device: torch.device | str = "cpu",
        skin_angstrom: float = 1.0,
        neighbor_backend: str = "vesin",
        compile: bool = False,
    ) -> None:
        want = parse_dtype(dtype)
        if not isinstance(bundle, LoadedBundle):
            bundle = load_bundle(bundle, dtype=want, device=device)
        else:
            bundle.model.to(device=device, dtype=want or bundle.dtype)
        self.bundle = bundle
        self.device = torch.device(device)
        # the requested dtype wins, also for analytic models without float weights
        self.dtype = want or bundle.dtype
        #: the eager model (always available)
        self.model = bundle.model
        #: compiled inference on (turned off if compilation fails)
        self.compile = bool(compile)
        self._compiled = None
        self._checked: tuple | None = None
        self._image_index: tuple | None = None
        self._species = torch.zeros(119, dtype=torch.bool)
        self._species[torch.tensor(bundle.species)] = True
        # unit factors: provider (Å, eV) <-> bundle
        self._to_model_length = units.factor("Angstrom", bundle.length_unit)
        self._from_model = {}
        for name, spec in bundle.outputs.items():
            target = PROVIDER_UNITS.get(name)
            self._from_model[name] = units.factor(spec["unit"], target) if target else 1.0
        cutoff_A = bundle.cutoff / self._to_model_length
        self.cutoff_angstrom = cutoff_A
        self.neighbors = None
        if cutoff_A > 0 and skin_angstrom > 0:
            from spkserve.neighbors.skin import SkinNeighborList

            self.neighbors = SkinNeighborList(cutoff_A, skin_angstrom, backend=neighbor_backend)
        elif cutoff_A > 0:
            self.neighbors = functools.partial(_plain_neighbors, cutoff=cutoff_A, backend=neighbor_backend)

    @property
    def available_properties(self) -> tuple[str, ...]:
        return tuple(self.bundle.outputs)

    @property
    def metadata(self) -> dict:
        return self.bundle.metadata

    def _check(self, numbers: torch.Tensor, properties: Sequence[str], pbc: torch.Tensor) -> None:
        # the same, unmodified tensors as last call (an MD run): checked already. The
        # tensors themselves are kept, so their ids cannot be reused by new tensors.
        last = self._checked
        if (
            last is not None and last[0] is numbers and last[1] == numbers._version
            and last[2] is pbc and last[3] == pbc._version and last[4] == tuple(properties)
        ):
            return
        self._check_uncached(numbers, properties, pbc)
        self._checked = (numbers, numbers._version, pbc, pbc._version, tuple(properties))

    def _check_uncached(self, numbers: torch.Tensor, properties: Sequence[str], pbc: torch.Tensor) -> None:
        unknown = [p for p in properties if p not in self.bundle.outputs]
        if unknown:
            raise ProviderError(
                f"the bundle cannot compute {unknown}; it provides {sorted(self.bundle.outputs)}"
            )
        if numbers.numel() and (int(numbers.min()) < 1 or int(numbers.max()) > 118 or not bool(self._species[numbers.cpu()].all())):
            try:
                self.bundle.check_species(numbers)
            except BundleError as err:
                raise ProviderError(str(err)) from err
            raise ProviderError(f"atomic numbers must lie in 1..118, got {sorted(set(numbers.tolist()))}")
        if keys.stress in properties and not bool(pbc.all()):
            raise ProviderError("stress needs fully periodic systems (pbc all True with a cell)")

    def compute_tensors(
        self,
        numbers: torch.Tensor,
        positions_angstrom: torch.Tensor,
        cells_angstrom: torch.Tensor,
        pbc: torch.Tensor,
        n_atoms: torch.Tensor,
        properties: Sequence[str] = (keys.energy, keys.forces),
    ) -> dict[str, torch.Tensor]:
        """Evaluate a batch given as tensors (Å); results in provider units.

        Args:
            numbers: [N] atomic numbers.
            positions_angstrom: [N, 3].
            cells_angstrom: [S, 3, 3] lattice vectors as rows.
            pbc: [S, 3] bool.
            n_atoms: [S] atoms per system.
            properties: outputs wanted (``energy`` always included).
        Returns:
            dict of tensors in the model's dtype and device, in provider units.
        """
        self._check(numbers, properties, pbc)
        dev, dt = self.device, self.dtype
        f = self._to_model_length
        R = positions_angstrom.to(device=dev, dtype=dt)
        C = cells_angstrom.to(device=dev, dtype=dt)
        if f != 1.0:
            R = R * f
            C = C * f
        n_atoms = n_atoms.to(dev)
        batch = {
            keys.Z: numbers.to(dev),
            keys.R: R,
            keys.cell: C,
            keys.pbc: pbc.to(dev),
            keys.n_atoms: n_atoms,
            keys.idx_m: self._system_index(n_atoms),
        }
        if self.neighbors is not None:
            i, j, s = self.neighbors(positions_angstrom, cells_angstrom, pbc, n_atoms)
            batch[keys.idx_i], batch[keys.idx_j] = i.to(dev), j.to(dev)
            batch[keys.shifts] = s.to(device=dev, dtype=dt)
        else:
            empty = torch.zeros(0, dtype=torch.long, device=dev)
            batch[keys.idx_i] = batch[keys.idx_j] = empty
            batch[keys.shifts] = torch.zeros(0, 3, dtype=dt, device=dev)
        props = tuple(dict.fromkeys((keys.energy, *properties)))
        with torch.enable_grad():
            out = self._call(batch, props)
        return {k: (v.detach() * self._from_model[k] if self._from_model.get(k, 1.0) != 1.0 else v.detach()) for k, v in out.items() if k in props}

    def _system_index(self, n_atoms: torch.Tensor) -> torch.Tensor:
        """System index of every atom (cached for the same ``n_atoms`` tensor)."""
        last = self._image_index
        if last is None or last[0] is not n_atoms or last[1] != n_atoms._version:
            idx = torch.repeat_interleave(torch.arange(len(n_atoms), device=n_atoms.device), n_atoms)
            self._image_index = last = (n_atoms, n_atoms._version, idx)
        return last[2]

    def compiled_model(self):
        """The compiled :meth:`~spkserve.model.AtomisticModel.forward_functional` (created on
        first use): dynamic shapes, C++ wrapper, single-threaded kernels (small batches)."""
        if self._compiled is None:
            for m in self.model.modules():  # e.g. SchNet builds its filter table outside the graph
                if hasattr(m, "prepare_for_compile"):
                    m.prepare_for_compile()
            self._compiled = torch.compile(
                self.model.forward_functional, dynamic=True, options={"cpp_wrapper": True, "cpp.threads": 1}
            )
        return self._compiled

    def _call(self, batch: dict[str, torch.Tensor], props: tuple[str, ...]) -> dict[str, torch.Tensor]:
        if self.compile and batch[keys.idx_i].shape[0] < SMALL_PAIRS:
            try:
                # skin pairs stay: the cutoff functions mask them (no data-dependent shapes)
                with torch.no_grad():
                    return self.compiled_model()(batch, props)
            except Exception as err:  # inductor/dynamo failures: fall back to eager, once
                if not _is_compiler_error(err):
                    raise
                warnings.warn(f"torch.compile failed ({type(err).__name__}: {str(err)[:200]}); running the model eagerly")
                self.compile = False
        return self.model(batch, properties=props)

    def compute(
        self, structures: Sequence[Structure], properties: Sequence[str] = (keys.energy, keys.forces)
    ) -> dict[str, torch.Tensor]:
        """Evaluate structures (Å) together; results as float64 CPU tensors in provider units."""
        if len(structures) == 0:
            raise ProviderError("no structures to compute")
        b = collate(structures, dtype=torch.float64)
        out = self.compute_tensors(b[keys.Z], b[keys.R], b[keys.cell], b[keys.pbc], b[keys.n_atoms], properties)
        return {k: v.to(device="cpu", dtype=torch.float64) for k, v in out.items()}

    def close(self) -> None:
        """Nothing to release for an in-process model."""
