"""Test-split errors of the shipped response bundles, and the shielding bundle against a
per-element mean predictor (means over the training split), per element.

    python benchmarks/response_eval.py            # writes benchmarks/results/response.md

The splits are the ones the bundles were trained with (benchmarks/splits/*.split.npz).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from ase.io import read

from spkserve.ase import BundleCalculator

REPO = Path(__file__).resolve().parents[1]
DATA = next((p for p in (REPO.parent / "shared" / "data", REPO.parent.parent / "shared" / "data") if p.is_dir()),
            REPO.parent / "shared" / "data")
SETS = {
    "ethanol-response": ("xtb/ethanol_gfn2xtb_500K_response.extxyz", ["dipole_moment", "polarizability"]),
    "ethanol-pbe-shielding": ("dft/ethanol_pbe_def2svp_shielding.extxyz", ["dipole_moment", "nuclear_magnetic_shielding"]),
}


def target(frame, name):
    if name == "nuclear_magnetic_shielding":
        return np.asarray(frame.arrays[name]).reshape(-1, 3, 3)
    v = np.asarray(frame.info[name], dtype=float)
    return v.reshape(3, 3) if name == "polarizability" else v


def main() -> None:
    lines = ["# Response bundles: test-split errors", "",
             f"`python benchmarks/response_eval.py` (bundles in spkserve/data, splits in benchmarks/splits)", ""]
    for name, (rel, props) in SETS.items():
        frames = read(DATA / rel, index=":")
        split = np.load(REPO / "benchmarks" / "splits" / f"{name}.split.npz")
        calc = BundleCalculator(REPO / "spkserve" / "data" / f"{name}.bundle", dtype="float64", extra_properties=props)
        err = {p: [] for p in ["energy", "forces"] + props}
        preds = {p: [] for p in props}
        for i in split["test_idx"]:
            at = frames[int(i)].copy()
            e_ref, f_ref = frames[int(i)].get_potential_energy(), frames[int(i)].get_forces()
            at.calc = calc
            err["energy"].append(abs(at.get_potential_energy() - e_ref))
            err["forces"].append(np.abs(at.get_forces() - f_ref).ravel())
            for p in props:
                pred = np.asarray(calc.get_property(p, at))
                preds[p].append(pred)
                err[p].append(np.abs(pred - target(frames[int(i)], p)).ravel())
        n = len(split["test_idx"])
        lines += [f"## {name}.bundle ({n} test frames of {rel})", "", "| property | MAE | RMSE |", "|---|---|---|"]
        unit = {"energy": "eV", "forces": "eV/Å", "dipole_moment": "e·Å", "polarizability": "e·Å²/V",
                "nuclear_magnetic_shielding": "ppm"}
        for p, v in err.items():
            a = np.concatenate([np.ravel(x) for x in v])
            lines.append(f"| {p} ({unit[p]}) | {a.mean():.4g} | {np.sqrt((a ** 2).mean()):.4g} |")
        lines.append("")
        if "nuclear_magnetic_shielding" in props:
            lines += ["Shielding per element (all 9 tensor components), model vs per-element mean tensor of the "
                      "training split:", "", "| element | model MAE (ppm) | mean-predictor MAE (ppm) | ratio |",
                      "|---|---|---|---|"]
            train = [frames[int(i)] for i in split["train_idx"]]
            z_train = np.concatenate([f.numbers for f in train])
            s_train = np.concatenate([target(f, "nuclear_magnetic_shielding") for f in train])
            z_test = np.concatenate([frames[int(i)].numbers for i in split["test_idx"]])
            s_test = np.concatenate([target(frames[int(i)], "nuclear_magnetic_shielding") for i in split["test_idx"]])
            s_pred = np.concatenate(preds["nuclear_magnetic_shielding"])
            for z, sym in ((1, "H"), (6, "C"), (8, "O")):
                mean = s_train[z_train == z].mean(0)
                m_model = np.abs(s_pred[z_test == z] - s_test[z_test == z]).mean()
                m_base = np.abs(mean - s_test[z_test == z]).mean()
                lines.append(f"| {sym} | {m_model:.3g} | {m_base:.3g} | {m_base / m_model:.2f}x |")
            lines.append("")
    out = REPO / "benchmarks" / "results" / "response.md"
    out.write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
