"""An ASE calculator that runs an external program through files (ORCA-style).

    calc = FileCalculator(command="orca {input} > {output}", input_name="job.xyz",
                          output_name="job.out", parser="mypkg.parsers:read_orca")

Each call: a fresh directory under ``directory``; the structure written as
``input_name`` (any ASE format, default extxyz); ``command`` run there (``{input}``
and ``{output}`` replaced by the file names; a string goes through the shell, a list
does not) with a time limit; the output parsed into energy and forces. The default
parser reads an extxyz/any ASE-readable ``output_name`` whose frame carries energy and
forces (``atoms.calc``); ``parser="module:function"`` names another one, called as
``function(path, atoms) -> {"energy": float, "forces": array [N, 3]}``. Values are
converted from ``energy_unit`` / ``length_unit`` to eV and Å with :mod:`spkserve.units`.

A non-zero exit status, a time-out, a missing or unreadable output, or non-finite
values raise :class:`ase.calculators.calculator.CalculationFailed` naming the directory,
so the active-learning loop can log and skip the frame.
"""

from __future__ import annotations

import importlib
import shlex
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
from ase.calculators.calculator import CalculationFailed, Calculator, all_changes

from spkserve import units


def _import(name: str) -> Callable:
    module, _, attr = name.partition(":")
    if not attr:
        raise ValueError(f"parser {name!r} must be 'module:function'")
    return getattr(importlib.import_module(module), attr)


def read_ase_output(path: Path, atoms) -> dict[str, Any]:
    """Default parser: an ASE-readable file whose last frame carries energy and forces."""
    import ase.io

    frame = ase.io.read(str(path), index=-1)
    if frame.calc is None:
        raise CalculationFailed(f"{path} holds no energy/forces")
    forces = frame.get_forces()
    if forces.shape != (len(atoms), 3):
        raise CalculationFailed(f"{path}: forces of shape {forces.shape}, expected ({len(atoms)}, 3)")
    return {"energy": float(frame.get_potential_energy()), "forces": forces}


class FileCalculator(Calculator):
    """Run ``command`` on a written input file and parse energy (eV) and forces (eV/Å).

    Args:
        command: shell string or argument list; ``{input}``/``{output}`` are substituted.
        input_name / output_name: file names inside the per-call directory.
        input_format: ASE format of the input file.
        parser: ``"module:function"`` or a callable; default :func:`read_ase_output`.
        energy_unit / length_unit: units the program reports (converted to eV, Å).
        timeout_s: seconds before the program is killed and the call fails.
        directory: parent of the per-call directories (default: the system temp dir).
        keep_files: keep the per-call directories (always kept when a call fails).
    """

    implemented_properties = ["energy", "free_energy", "forces"]

    def __init__(
        self,
        command: str | Sequence[str],
        input_name: str = "input.extxyz",
        output_name: str = "output.extxyz",
        input_format: str = "extxyz",
        parser: str | Callable | None = None,
        energy_unit: str = "eV",
        length_unit: str = "Angstrom",
        timeout_s: float = 3600.0,
        directory: str | None = None,
        keep_files: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(**kwargs)
        if not command:
            raise ValueError("FileCalculator needs a command")
        self.command = command
        self.input_name, self.output_name, self.input_format = input_name, output_name, input_format
        self.parser = read_ase_output if parser is None else (_import(parser) if isinstance(parser, str) else parser)
        self.energy_factor = units.factor(energy_unit, "eV")
        self.forces_factor = units.factor(f"{energy_unit}/{length_unit}", "eV/Angstrom")
        self.timeout_s = float(timeout_s)
        self.parent = directory
        self.keep_files = keep_files

    def _argv(self) -> tuple[str | list[str], bool]:
        sub = {"input": self.input_name, "output": self.output_name}
        if isinstance(self.command, str):
            return self.command.format(**{k: shlex.quote(v) for k, v in sub.items()}), True
        return [str(c).format(**sub) for c in self.command], False

    def calculate(self, atoms=None, properties=("energy",), system_changes=all_changes) -> None:
        import ase.io

        super().calculate(atoms, properties, system_changes)
        if self.parent:
            Path(self.parent).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix="filecalc_", dir=self.parent))
        clean = self.atoms.copy()
        clean.calc = None
        ase.io.write(str(work / self.input_name), clean, format=self.input_format)
        argv, shell = self._argv()
        try:
            proc = subprocess.run(argv, shell=shell, cwd=work, capture_output=True, text=True, timeout=self.timeout_s)
        except subprocess.TimeoutExpired as err:
            raise CalculationFailed(f"{argv!r} did not finish within {self.timeout_s} s (files in {work})") from err
        if proc.returncode != 0:
            raise CalculationFailed(
                f"{argv!r} exited with status {proc.returncode} (files in {work}): {proc.stderr.strip()[-500:]}"
            )
        out = work / self.output_name
        if not out.exists():
            raise CalculationFailed(f"{argv!r} wrote no {self.output_name} (files in {work})")
        try:
            res = self.parser(out, self.atoms)
        except CalculationFailed:
            raise
        except Exception as err:  # noqa: BLE001 - any parse failure means this frame has no label
            raise CalculationFailed(f"cannot parse {out}: {type(err).__name__}: {err}") from err
        energy = float(res["energy"]) * self.energy_factor
        forces = np.asarray(res["forces"], dtype=np.float64).reshape(len(self.atoms), 3) * self.forces_factor
        if not (np.isfinite(energy) and np.isfinite(forces).all()):
            raise CalculationFailed(f"{argv!r} returned non-finite energy or forces (files in {work})")
        self.results = {"energy": energy, "free_energy": energy, "forces": forces}
        if not self.keep_files:
            import shutil

            shutil.rmtree(work, ignore_errors=True)
