"""Generation quality of cG-SchNet bundles: validity, uniqueness, novelty, condition adherence.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gschnet_generation.py \
        --gap-bundle spkserve/data/gschnet_qm9_gap_relenergy.bundle \
        --comp-bundle RUN_DIR/best_model.bundle -n 100 \
        --out benchmarks/results/gschnet_generation.md --plot benchmarks/results/gschnet_generation.png

* gap targets: molecules generated for several HOMO-LUMO gap targets (relative atomic energy 0);
  the gap of every valid generated molecule is computed with GFN2-xTB (``tblite``, same settings
  as the training labels: accuracy 1.0, 300 K) and compared with the target.
* composition targets: the fraction of generated molecules with exactly the target composition.
* validity (RDKit bond perception if installed, else valence rules), uniqueness, novelty
  against all 500 molecules of the data file, fraction finished below ``max_n_atoms``, time per molecule.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from spkserve import units
from spkserve.nn.gschnet_analysis import analyse, have_rdkit, identify
from spkserve.nn.gschnet_sampling import generate, load_generator

_REL = Path("shared") / "data" / "public" / "qm9_500mols_U0_xtbgap_eV.extxyz"
DATA = next((p / _REL for p in Path(__file__).resolve().parents if (p / _REL).exists()), _REL)


def xtb_gap_eV(numbers: np.ndarray, positions_A: np.ndarray) -> float:
    """GFN2-xTB HOMO-LUMO gap (eV) as in shared/data/scripts/qm9_conditions.py."""
    from tblite.interface import Calculator

    c = Calculator("GFN2-xTB", numbers, positions_A * units.factor("Angstrom", "Bohr"))
    c.set("accuracy", 1.0)
    c.set("verbosity", 0)
    c.set("temperature", 300.0 * units.BOLTZMANN_J_PER_K / units.HARTREE_IN_J)  # kT in Hartree
    r = c.singlepoint()
    eps, occ = r.get("orbital-energies"), r.get("orbital-occupations")
    return float((eps[occ < 1.0].min() - eps[occ > 1.0].max()) * units.factor("Hartree", "eV"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gap-bundle", required=True)
    ap.add_argument("--comp-bundle", default=None)
    ap.add_argument("-n", type=int, default=100)
    ap.add_argument("--gaps", type=float, nargs="+", default=[3.0, 5.0, 8.0, 12.0])
    ap.add_argument("--compositions", nargs="+", default=["C5H10O", "C4H5NO", "C6H6", "C3H7NO2"])
    ap.add_argument("--max-n-atoms", type=int, default=35)
    ap.add_argument("--data", default=str(DATA))
    ap.add_argument("--out", default="benchmarks/results/gschnet_generation.md")
    ap.add_argument("--plot", default="benchmarks/results/gschnet_generation.png")
    ap.add_argument("--peer-db", nargs="*", default=[],
                    help="TARGET_GAP=PATH: ASE dbs written by schnetpack-gschnet's gschnet_generate, evaluated alike")
    ap.add_argument("--peer-note", default="")
    args = ap.parse_args()
    from ase.io import read

    torch.set_num_threads(1)
    use_rdkit = have_rdkit()
    frames = read(args.data, index=":")
    train_ids = {i for a in frames if (i := identify(a.numbers, a.positions, use_rdkit)) is not None}
    train_gaps = np.array([a.info["gap_gfn2xtb_eV"] for a in frames])
    try:
        import tblite  # noqa: F401

        have_xtb = True
    except ImportError:
        have_xtb = False
    lines = ["# cG-SchNet generation quality", "",
             f"Command: `OMP_NUM_THREADS=1 .venv/bin/python benchmarks/gschnet_generation.py --gap-bundle "
             f"{args.gap_bundle}" + (f" --comp-bundle {args.comp_bundle}" if args.comp_bundle else "") +
             f" -n {args.n} --gaps {' '.join(f'{g:g}' for g in args.gaps)}"
             + (f" --compositions {' '.join(args.compositions)}" if args.comp_bundle else "")
             + (f" --peer-db {' '.join(args.peer_db)}" if args.peer_db else "")
             + f" --out {args.out} --plot {args.plot}`  ",
             f"torch {torch.__version__}, {platform.machine()}, 1 thread, validity by "
             f"{'RDKit DetermineBonds' if use_rdkit else 'valence rules'}, gaps by "
             f"{'GFN2-xTB (tblite)' if have_xtb else 'n/a (tblite missing)'}; novelty against all "
             f"{len(frames)} molecules of {Path(args.data).name}.  ", ""]
    gap_rows, gap_values = [], {}
    model = load_generator(args.gap_bundle).model
    for g in args.gaps:
        res = generate(model, args.n, batch_size=args.n, max_n_atoms=args.max_n_atoms,
                       conditions={"gap": g, "relative_atomic_energy": 0.0}, seed=0)
        ana = analyse(res.numbers, res.positions, res.finished, train_ids, use_rdkit)
        s = ana["summary"]
        vals = []
        if have_xtb:
            for z, r, v in zip(res.numbers, res.positions, ana["valid"]):
                if v:
                    try:
                        vals.append(xtb_gap_eV(z, r))
                    except Exception as err:  # an SCF that fails to converge is reported, not hidden
                        print(f"xtb failed on a molecule: {err}")
        vals = np.array(vals)
        gap_values[g] = vals
        gap_rows.append((g, s, res.seconds / args.n, vals))
        print(g, s, vals.mean() if vals.size else None, flush=True)
    lines += ["## Gap targets (gap / relative-atomic-energy model, relative atomic energy 0)", "",
              f"{args.n} molecules per target, seed 0, max_n_atoms {args.max_n_atoms}. Training data gap: median "
              f"{np.median(train_gaps):.2f} eV, 10-90 % {np.percentile(train_gaps, 10):.2f}-"
              f"{np.percentile(train_gaps, 90):.2f} eV.", "",
              "| target gap eV | finished | valid | unique (of valid) | novel (of unique) | xTB gap of valid: median (10-90 %) eV | mean atoms | s/molecule |",
              "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for g, s, spm, vals in gap_rows:
        gq = (f"{np.median(vals):.2f} ({np.percentile(vals, 10):.2f}-{np.percentile(vals, 90):.2f}), n={vals.size}"
              if vals.size else "n/a")
        lines.append(f"| {g:g} | {s['finished_fraction']:.2f} | {s['valid_fraction_of_finished']:.2f} | "
                     f"{s['unique_fraction_of_valid']:.2f} | {s.get('novel_fraction_of_unique', float('nan')):.2f} | "
                     f"{gq} | {s['mean_n_atoms']:.1f} | {spm:.3f} |")
    comp_rows = []
    if args.comp_bundle:
        from spkserve.nn.gschnet_sampling import composition_counts

        cm = load_generator(args.comp_bundle).model
        counts_train = {}
        from ase.formula import Formula

        for a in frames:
            f = Formula(a.get_chemical_formula()).format("hill")
            counts_train[f] = counts_train.get(f, 0) + 1
        for comp in args.compositions:
            res = generate(cm, args.n, batch_size=args.n, max_n_atoms=args.max_n_atoms,
                           conditions={"composition": comp, "relative_atomic_energy": 0.0}, seed=0)
            target = composition_counts(comp, cm.atom_types)
            hit = [bool(f) and [int(np.count_nonzero(z == t)) for t in cm.atom_types] == target
                   for z, f in zip(res.numbers, res.finished)]
            ana = analyse(res.numbers, res.positions, res.finished, train_ids, use_rdkit)
            s = ana["summary"]
            comp_rows.append((comp, float(np.mean(hit)), s, counts_train.get(Formula(comp).format("hill"), 0)))
            print(comp, np.mean(hit), s, flush=True)
        lines += ["", "## Composition targets (composition / relative-atomic-energy model)", "",
                  "| target | molecules of it in the data | exact composition | finished | valid | unique (of valid) | novel (of unique) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for comp, frac, s, ntr in comp_rows:
            lines.append(f"| {comp} | {ntr} | {frac:.2f} | {s['finished_fraction']:.2f} | "
                         f"{s['valid_fraction_of_finished']:.2f} | {s['unique_fraction_of_valid']:.2f} | "
                         f"{s.get('novel_fraction_of_unique', float('nan')):.2f} |")
    if args.peer_db:
        from ase.db import connect

        lines += ["", "## Peer: schnetpack-gschnet (same data, same evaluation)", "", args.peer_note, "",
                  "| target gap eV | molecules in db | valid | unique (of valid) | novel (of unique) | xTB gap of valid: median (10-90 %) eV | mean atoms |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for item in args.peer_db:
            g, path = item.split("=", 1)
            with connect(path) as db:
                rows = [r.toatoms() for r in db.select()]
            Z = [a.numbers for a in rows]
            R = [a.positions for a in rows]
            ana = analyse(Z, R, np.ones(len(rows), bool), train_ids, use_rdkit)
            s = ana["summary"]
            vals = np.array([xtb_gap_eV(z, r) for z, r, v in zip(Z, R, ana["valid"]) if v]) if have_xtb else np.array([])
            gq = (f"{np.median(vals):.2f} ({np.percentile(vals, 10):.2f}-{np.percentile(vals, 90):.2f}), n={vals.size}"
                  if vals.size else "n/a")
            lines.append(f"| {g} | {len(rows)} | {s['valid_fraction_of_finished']:.2f} | {s['unique_fraction_of_valid']:.2f} | "
                         f"{s.get('novel_fraction_of_unique', float('nan')):.2f} | {gq} | {s['mean_n_atoms']:.1f} |")
            print("peer", g, s, flush=True)
    lines += ["", f"Load average at the end: {' '.join(f'{x:.2f}' for x in os.getloadavg())}.", ""]
    Path(args.out).write_text("\n".join(lines))
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2 if comp_rows else 1, figsize=(11 if comp_rows else 6, 4), squeeze=False)
    ax = axes[0, 0]
    bins = np.linspace(0, 18, 37)
    ax.hist(train_gaps, bins=bins, density=True, histtype="step", color="k", ls="--", label="training data")
    for (g, vals), c in zip(gap_values.items(), plt.cm.viridis(np.linspace(0, 0.9, len(gap_values)))):
        if vals.size:
            ax.hist(vals, bins=bins, density=True, alpha=0.35, color=c, label=f"target {g:g} eV (n={vals.size})")
            ax.axvline(g, color=c, lw=2)
    ax.set_xlabel("GFN2-xTB HOMO-LUMO gap of generated valid molecules (eV)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    if comp_rows:
        ax = axes[0, 1]
        ax.bar([c for c, *_ in comp_rows], [f for _, f, *_ in comp_rows], color="tab:blue")
        ax.set_ylabel("fraction with exactly the target composition")
        ax.set_ylim(0, 1)
    fig.tight_layout()
    fig.savefig(args.plot, dpi=110)
    print(f"wrote {args.out} and {args.plot}")


if __name__ == "__main__":
    main()
