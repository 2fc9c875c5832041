"""An i-PI PES module: run a bundle inside i-PI, no socket.

i-PI loads custom PES classes from a file, so pass this file's path:

* in i-PI's input (``<ffdirect>``; ``batch_size`` > 1 makes i-PI hand over
  lists of structures, evaluated here in one model call)::

      <ffdirect name="spk">
        <pes>custom</pes>
        <pes_path>/path/to/spkserve/ipi/pes.py</pes_path>
        <parameters>{bundle: model.bundle, template: init.xyz}</parameters>
        <batch_size>8</batch_size>
      </ffdirect>

* with i-PI's Python driver (a socket client, handy to test)::

      i-pi-py_driver -u -a NAME -m custom -P /path/to/spkserve/ipi/pes.py \
          -o bundle=model.bundle,template=init.xyz

``python -c "import spkserve.ipi.pes as m; print(m.__file__)"`` prints the path.

Parameters: ``bundle`` (path), ``template`` (structure file with the species)
or ``species`` (symbols separated by spaces or colons), ``dtype``
(float32/float64), ``device``, ``pbc`` (auto/true/false: auto = periodic when
the cell is non-singular).

i-PI passes the cell as its ``h`` matrix (lattice vectors as columns) and
positions in Bohr; results go back in Hartree atomic units, the virial
transposed like on the socket.
"""

from __future__ import annotations

import numpy as np

# read by i-PI's loader (ipi.pes.load_pes) without importing the module
__DRIVER_NAME__ = "spkserve"
__DRIVER_CLASS__ = "SpkservePES"


def _parse_pbc(value) -> str | bool:
    text = str(value).strip().lower()
    if text == "auto":
        return "auto"
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no"):
        return False
    raise ValueError(f"pbc must be auto, true or false, got {value!r}")


class SpkservePES:
    """Callable i-PI PES: ``pes(cell_h, pos)`` or ``pes([cell_h, ...], [pos, ...])``."""

    def __init__(
        self,
        bundle: str,
        template: str | None = None,
        species: str | None = None,
        dtype: str | None = None,
        device: str = "cpu",
        pbc: str = "auto",
        verbose: bool = False,
        **ignored,
    ) -> None:
        # i-PI's <ffdirect> adds "verbosity"; nothing else may be silently dropped
        ignored.pop("verbosity", None)
        if ignored:
            raise ValueError(f"unknown spkserve PES parameter(s) {sorted(ignored)}; use bundle, template/species, dtype, device, pbc")
        from spkserve.ipi.evaluate import BundleEvaluator, species_from_symbols, species_from_template
        from spkserve.ensemble import open_runner

        if (template is None) == (species is None):
            raise ValueError("give exactly one of template=FILE or species='C H O ...' (i-PI never passes species)")
        numbers = species_from_template(str(template)) if template else species_from_symbols(str(species).replace(":", " "))
        runner = open_runner(str(bundle), dtype=dtype or None, device=device)
        self.evaluator = BundleEvaluator(runner, numbers, pbc=_parse_pbc(pbc))
        self.verbose = verbose

    def _run(self, cells_h: list[np.ndarray], positions: list[np.ndarray]) -> list[tuple]:
        h = np.array([np.asarray(c, np.float64).reshape(3, 3) for c in cells_h])
        cells_rows = np.swapaxes(h, 1, 2)
        pos = np.array([np.asarray(p, np.float64).reshape(-1, 3) for p in positions])
        energies, forces, virials, extras = self.evaluator(cells_rows, pos)
        return [
            (float(energies[b]), forces[b].reshape(np.shape(positions[b])), virials[b].T.copy(), extras[b])
            for b in range(len(h))
        ]

    def __call__(self, cell, pos):
        """One structure -> (pot, forces, virial, extras); lists -> a list of those."""
        if isinstance(cell, list):
            if not isinstance(pos, list) or len(cell) != len(pos):
                raise ValueError("batched evaluation needs lists of cells and positions of equal length")
            return self._run(cell, pos)
        return self._run([cell], [pos])[0]
