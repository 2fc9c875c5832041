"""IR/Raman peak positions from MD logs of the shipped response bundle versus the same bundle's
harmonic frequencies and IR intensities (ASE Vibrations / Infrared), written to
benchmarks/results/response_spectra.md.

    # a low-temperature classical run (NVE after a 50 K start) and the 16-bead RPMD run
    spkmd simulation_dir=runs/classical50 calculator.model_file=ethanol-response.bundle \
        system.initializer.temperature=50 dynamics.integrator.time_step=0.5 dynamics.n_steps=6000 \
        calculator.properties=[dipole_moment,polarizability]
    python benchmarks/response_spectra.py runs/classical50 [runs/rpmd16]
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np
from ase.io import read
from ase.optimize import BFGS
from ase.vibrations import Infrared

from spkserve.ase import BundleCalculator
from spkmd.data import HDF5Loader
from spkmd.spectra import compute_spectra, ir_spectrum, peak_positions, raman_spectrum

REPO = Path(__file__).resolve().parents[1]
BUNDLE = REPO / "spkserve" / "data" / "ethanol-response.bundle"


def harmonic():
    atoms = read(REPO / "configs" / "md" / "system" / "ethanol.xyz", index=-1)
    atoms.calc = BundleCalculator(BUNDLE, dtype="float64")
    BFGS(atoms, logfile=None).run(fmax=1e-4, steps=500)
    with tempfile.TemporaryDirectory() as tmp:
        ir = Infrared(atoms, name=str(Path(tmp) / "ir"), delta=0.005, nfree=4)
        ir.run()
        freq = np.real(ir.get_frequencies())[6:]
        inten = ir.intensities[6:]
    return freq, inten


def main(dirs: list[str]) -> None:
    freq, inten = harmonic()
    order = np.argsort(inten)[::-1]
    lines = ["# Spectra of the shipped response bundle vs its harmonic analysis", "",
             "`python benchmarks/response_spectra.py " + " ".join(dirs) + "`", "",
             "Harmonic frequencies (ASE Vibrations on the bundle, BFGS minimum) with ASE Infrared intensities "
             "((D/Å)²/amu):", "", "| mode | cm⁻¹ | IR intensity |", "|---|---|---|"]
    lines += [f"| {k + 1} | {f:.0f} | {i:.4f} |" for k, (f, i) in enumerate(zip(freq, inten))]
    lines.append("")
    for d in dirs:
        log_path = Path(d) / "simulation.hdf5"
        files, info = compute_spectra(log_path, Path(d) / "spectra.png", kinds=["power", "ir", "raman"], skip_ps=0.5)
        log = HDF5Loader(log_path, skip_initial=int(round(500 / float(np.diff(HDF5Loader(log_path).times_fs[:2])[0]))))
        wn, y = ir_spectrum(log, normalize=False)
        peaks = peak_positions(wn, y, n=6, min_wavenumber=300)
        lines += [f"## {d}", "", f"`spkmd spectrum {d} --power --ir --raman --skip-ps 0.5`: {info}", ""]
        lines.append("| MD IR peak (cm⁻¹) | nearest harmonic (cm⁻¹) | shift |")
        lines.append("|---|---|---|")
        for p in peaks:
            h = freq[np.argmin(np.abs(freq - p))]
            lines.append(f"| {p:.0f} | {h:.0f} | {100 * (p - h) / h:+.1f} % |")
        # relative IR intensities: band areas around the three strongest harmonic modes
        lines += ["", "Relative IR intensity of the strongest harmonic bands (band area ±40 cm⁻¹ in the MD "
                  "spectrum vs ASE Infrared, both normalised to the strongest):", "",
                  "| harmonic cm⁻¹ | ASE Infrared | MD |", "|---|---|---|"]
        areas = []
        for k in order[:3]:
            sel = np.abs(wn - freq[k]) < 40
            areas.append(float(np.trapezoid(y[sel], wn[sel])))
        for k, a in zip(order[:3], areas):
            lines.append(f"| {freq[k]:.0f} | {inten[k] / inten[order[0]]:.2f} | {a / areas[0]:.2f} |")
        rs = raman_spectrum(log)
        rp = peak_positions(rs.wavenumber, rs.curves["polarized"], n=6, min_wavenumber=300)
        lines += ["", "Raman (polarized) peaks: " + ", ".join(f"{p:.0f}" for p in rp) + " cm⁻¹", "",
                  f"Plots and numbers: {files[0]} / {files[1]}", ""]
    out = REPO / "benchmarks" / "results" / "response_spectra.md"
    out.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main(sys.argv[1:])
