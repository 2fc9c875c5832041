"""Active learning vs random frames from the same MD, on ethanol with GFN2-xTB (tblite).

    OMP_NUM_THREADS=1 python benchmarks/active_learning.py --rounds 3 --top-k 84 --steps-per-model 800 \
        --md-steps 1500 --extra committee.n_models=3 selection.min_separation_fs=20     # the recorded run

Starts from 50 frames of ``../shared/data/xtb/ethanol_gfn2xtb_500K.extxyz``, runs
``configs/active_learning/ethanol_tblite.yaml`` (committees of small SchNets, 4 molecules of MD
at 500 K per round, top-k uncertain frames per round labelled with tblite GFN2-xTB) with
``baseline.random=true``: every round the same number of frames is also drawn uniformly from the
same MD, labelled, and a second committee is trained on those. Both are evaluated on 500
held-out frames of the shared set (its frames not in the initial 50). Also reported: the
Spearman rank correlation of the committee force spread with the true per-frame force error.

Writes ``benchmarks/results/active_learning.md`` and ``benchmarks/results/active_learning.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent.parent / "shared" / "data" / "xtb" / "ethanol_gfn2xtb_500K.extxyz"


def _loadavg() -> str:
    try:
        return Path("/proc/loadavg").read_text().split(" ")[0:3].__str__()
    except OSError:
        return "n/a"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--top-k", type=int, default=63)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--work", default=str(ROOT / "runs" / "bench_al"))
    ap.add_argument("--data", default=str(DATA if DATA.exists() else "/work/shared/data/xtb/ethanol_gfn2xtb_500K.extxyz"))
    ap.add_argument("--steps-per-model", type=int, default=1500)
    ap.add_argument("--md-steps", type=int, default=2000)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "active_learning.md"))
    ap.add_argument("--extra", nargs="*", default=[], help="further loop overrides key=value")
    ap.add_argument("--report-only", action="store_true", help="rewrite the results from WORK/seed_*/rounds.json")
    args = ap.parse_args()

    from training.active_learning import load_config, run_loop

    if args.report_only:
        from omegaconf import OmegaConf

        runs = []
        for seed in args.seeds:
            d = Path(args.work) / f"seed_{seed}"
            log = json.loads((d / "rounds.json").read_text())
            secs = sum(e.get("seconds", 0.0) for e in log["rounds"])
            runs.append({"seed": seed, "rounds": log["rounds"], "seconds": secs, "cfg": OmegaConf.load(d / "config.yaml")})
        loads = [Path(args.work, "loadavg.txt").read_text().strip()] if Path(args.work, "loadavg.txt").exists() else ["n/a"]
        write_results(runs, args, sum(r["seconds"] for r in runs), loads)
        return

    cfg_file = ROOT / "configs" / "active_learning" / "ethanol_tblite.yaml"
    runs = []
    loads = [_loadavg()]
    t0 = time.perf_counter()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    Path(args.work, "command.txt").write_text(_command(args) + "\n")
    for seed in args.seeds:
        cfg = load_config(cfg_file, [
            f"work_dir={Path(args.work) / f'seed_{seed}'}", f"seed={seed}", f"rounds={args.rounds}",
            f"initial.file={args.data}", f"selection.top_k={args.top_k}", "baseline.random=true",
            f"committee.steps_per_model={args.steps_per_model}", f"md.n_steps={args.md_steps}", *args.extra,
        ])
        t = time.perf_counter()
        res = run_loop(cfg, progress=lambda s: print(s, flush=True))
        log = json.loads(Path(res["log"]).read_text())
        runs.append({"seed": seed, "rounds": res["rounds"], "seconds": time.perf_counter() - t,
                     "wall_this_call": log.get("wall_seconds_this_call"), "cfg": cfg})
        loads.append(_loadavg())
    Path(args.work, "loadavg.txt").write_text("; ".join(loads))
    total = time.perf_counter() - t0
    write_results(runs, args, total, loads)


def _command(args) -> str:
    saved = Path(args.work, "command.txt")
    if saved.exists():
        return saved.read_text().strip()
    return "OMP_NUM_THREADS=1 python benchmarks/active_learning.py " + " ".join(sys.argv[1:])


def write_results(runs, args, total_s: float, loads) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    png = out.with_suffix(".png")
    cfg = runs[0]["cfg"]
    lines = [
        "# Active learning vs random frames (ethanol, GFN2-xTB via tblite)",
        "",
        f"Command: `{_command(args)}` (config `configs/active_learning/ethanol_tblite.yaml`; "
        "`--report-only` rewrites this file from the run directories).",
        "",
        f"Setup: {cfg.initial.n_frames} initial frames drawn at random from `ethanol_gfn2xtb_500K.extxyz`; held-out test = "
        f"{cfg.test.max_frames} of its other frames. Committee: {cfg.committee.n_models} SchNet members "
        "(32 features, 2 interactions, cutoff 5 Å, 13.5k parameters each), "
        f"{cfg.committee.steps_per_model} optimizer steps each, different seeds, no bootstrap. "
        f"MD per round: {cfg.md.replicas} molecules side by side, {cfg.md.n_steps} steps of {cfg.md.time_step_fs} fs "
        f"Langevin at {cfg.md.temperature_K} K with the committee (spkmd), frames every {cfg.md.log_every_n_steps} steps. "
        f"Selection: top {cfg.selection.top_k} by max per-atom force spread, >= {cfg.selection.threshold_forces} eV/Å, "
        f"{cfg.selection.min_separation_fs} fs apart per molecule, first {cfg.selection.skip_fs} fs skipped, "
        f"a molecule's frames after its spread first reached {cfg.selection.get('max_forces')} eV/Å not used. "
        "Random baseline: the same number of frames per round drawn uniformly from the same MD logs, labelled the same way, "
        "committee trained with the same seeds.",
        "",
        f"Machine: {platform.processor() or platform.machine()}, shared 2 cores, load average (1/5/15 min) at start/after each seed: "
        + "; ".join(loads) + f". Total wall time {total_s / 60:.1f} min.",
        "",
    ]
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for run in runs:
        rs = run["rounds"]
        lines += [
            f"## seed {run['seed']} (wall time {run['seconds'] / 60:.1f} min)",
            "",
            "| round | labelled frames | AL force MAE (eV/Å) | random force MAE (eV/Å) | AL force RMSE | random force RMSE | "
            "spread–error Spearman (AL committee) | selected / failed | MD frames (usable) | round time (s) |",
            "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
        ]
        for e in rs:
            rnd = e.get("random_eval", {})
            lines.append(
                f"| {e['round']} | {e['n_labelled']} | {e['eval']['forces_mae']:.4f} | {rnd.get('forces_mae', float('nan')):.4f} | "
                f"{e['eval']['forces_rmse']:.4f} | {rnd.get('forces_rmse', float('nan')):.4f} | "
                f"{e['eval']['spread_error_spearman']:.3f} | {e.get('selected', '-')} / {e.get('failed', '-')} | "
                f"{e.get('md_frames', '-')} ({e.get('md_trusted_frames', '-')}) | {e.get('seconds', float('nan')):.0f} |"
            )
        al = [e["eval"]["forces_mae"] for e in rs[1:]]
        rd = [e["random_eval"]["forces_mae"] for e in rs[1:]]
        below = sum(a < b for a, b in zip(al, rd))
        diffs = ", ".join(f"{1000 * (b - a):+.1f}" for a, b in zip(al, rd))
        lines += ["", f"Random minus active-learning force MAE per round after round 0 (meV/Å): {diffs}. "
                  "One seed: differences of a few meV/Å are within what another seed could change. "
                  f"Active learning below random in {below} of {len(al)} rounds after round 0 "
                  f"(final: {al[-1]:.4f} vs {rd[-1]:.4f} eV/Å at {rs[-1]['n_labelled']} frames)." if al else "", ""]
        n = [e["n_labelled"] for e in rs]
        axes[0].plot(n, [e["eval"]["forces_mae"] for e in rs], "o-", label=f"active learning (seed {run['seed']})")
        axes[0].plot(n, [e["random_eval"]["forces_mae"] for e in rs], "s--", label=f"random from same MD (seed {run['seed']})")
        axes[1].plot(n, [e["eval"]["spread_error_spearman"] for e in rs], "o-", label=f"seed {run['seed']}")
    axes[0].set_xlabel("labelled frames")
    axes[0].set_ylabel("held-out force MAE (eV/Å)")
    axes[0].legend(fontsize=8)
    axes[0].grid(alpha=0.3)
    axes[1].set_xlabel("labelled frames")
    axes[1].set_ylabel("Spearman(force spread, max force error)")
    axes[1].set_ylim(-0.2, 1.0)
    axes[1].grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    lines += [f"Plot: `{png.name}` (left: held-out force MAE per round; right: spread–error rank correlation).", ""]
    out.write_text("\n".join(lines))
    print(f"wrote {out} and {png}")
    del np


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    main()
