"""Model bundles shipped with the package (installed as package data).

``ethanol-painn.bundle``: PaiNN trained with ``spktrain experiment=ethanol_xtb`` on the
GFN2-xTB ethanol trajectory (Å, eV); its test metrics are in the bundle's provenance
(``spkserve info``).
"""

from __future__ import annotations

from pathlib import Path

#: directory of the shipped bundles
DATA_DIR = Path(__file__).resolve().parent

#: PaiNN potential for ethanol (GFN2-xTB level)
ETHANOL_PAINN = DATA_DIR / "ethanol-painn.bundle"
