"""NPT validation figures: density convergence from ±10 % off, volume fluctuations against
the compressibility, the stochastic-cell-rescaling effective-energy drift, and the skin
neighbor list in NPT (ms per step, rebuild fraction).

    .venv/bin/python benchmarks/npt.py            # writes results/npt.md and results/npt.png

Systems: Lennard-Jones argon (σ = 3.405 Å, ε/k_B = 119.8 K, truncated and shifted at 2.5 σ,
T* = 2, P* from the JZG EOS at ρ* = 0.8 minus the tail term) and an ideal gas (zero forces,
exact volume distribution). The helpers are shared with tests/test_npt_validation.py.
"""

from __future__ import annotations

import argparse
import math
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))

from npt_helpers import (IdealGas, batch_stats, ideal_gas_boxes, ideal_gas_pressure_bar,  # noqa: E402
                         integrator_and_thermostat, make_barostat, volumes_A3)
from test_npt_lj import (EPS_EV, EPS_K, P_RED_TO_BAR, RC, SIGMA_A, _boxes, _melt, jzg_pressure,  # noqa: E402
                         tail_pressure)

from spkserve import units  # noqa: E402
from spkserve.potentials import reference_bundle  # noqa: E402
from spkmd.calculators import BundleCalculator  # noqa: E402
from spkmd.initializers import MaxwellBoltzmann  # noqa: E402
from spkmd.simulator import Simulator  # noqa: E402
from spkmd.system import System  # noqa: E402

KINDS = ["mtk", "anisotropic", "pile", "scr"]
TAU = {"mtk": 300.0, "anisotropic": 300.0, "pile": 1500.0, "scr": 300.0}  # volume periods/relaxation ≳ 15 steps
RHO0, T_RED = 0.8, 2.0


def p_eos_red(rho: float) -> float:
    return jzg_pressure(T_RED, rho) - tail_pressure(rho)


def kappa_T_eos_per_bar(rho: float) -> float:
    """κ_T = 1/(ρ dP/dρ) from the JZG EOS with the tail term (central difference), 1/bar."""
    h = 1e-4
    dp = (p_eos_red(rho + h) - p_eos_red(rho - h)) / (2 * h)
    return 1.0 / (rho * dp * P_RED_TO_BAR)


def lj_density_run(bundle, kind: str, n_per_start: int, n_eq: int, n_prod: int, size: int = 2, seed: int = 0):
    """ρ*(t) [n_eq + n_prod, 2·n_per_start] and V(t) in Å³ for boxes started at 0.9 and 1.1 ρ*."""
    T = T_RED * EPS_K
    baro = make_barostat(kind, p_eos_red(RHO0) * P_RED_TO_BAR, T, TAU[kind], 1.7e-4)
    boxes = []
    for k, f in enumerate([0.9] * n_per_start + [1.1] * n_per_start):
        boxes += _boxes(RHO0 * f, 1, size=size, seed=seed + k, jitter=0.15, remove=3)  # 29 atoms
    system = System.from_atoms(boxes)
    MaxwellBoltzmann(T, remove_translation=False)(system, torch.Generator().manual_seed(seed))
    calc = BundleCalculator(bundle, stress=True)
    _melt(system, calc, T, 30)
    integ, thermo = integrator_and_thermostat(kind, baro, 12.0, T, 100.0)
    sim = Simulator(system, integ, calc, hooks=[thermo, baro], seed=seed + 10)
    vols = []
    for _ in range(n_eq + n_prod):
        sim.simulate(1)
        vols.append(volumes_A3(system))
    vols = np.array(vols)
    n = system.n_atoms.numpy()
    return n / vols * SIGMA_A**3, vols


def ideal_gas_run(kind: str, n_boxes: int, n_steps: int, N: int = 16, T: float = 300.0, V0: float = 1000.0):
    P = ideal_gas_pressure_bar(N, T, V0)
    nb = 2 if kind == "pile_rpmd" else 1
    system = ideal_gas_boxes(n_boxes, N, V0, seed=1, n_replicas=nb)
    MaxwellBoltzmann(T * nb, remove_translation=False)(system, torch.Generator().manual_seed(1))
    tau = 1000.0 / (2 * math.pi) if kind == "mtk" else 1000.0
    baro = make_barostat(kind, P, T, tau, 1.0 / P)
    integ, thermo = integrator_and_thermostat(kind, baro, 15.0 if kind == "pile_rpmd" else 20.0, T, 200.0)
    sim = Simulator(system, integ, IdealGas(), hooks=[thermo, baro], seed=1)
    sim.simulate(120)
    vols = []
    for _ in range(n_steps):
        sim.simulate(1)
        vols.append(volumes_A3(system))
    mean, me, var, ve = batch_stats(np.array(vols))
    exact_var = (N + 1) * (V0 / (N + 1)) ** 2
    return mean / V0, me / V0, var / exact_var, ve / exact_var


def drift_run(bundle, kind: str, dt_fs: float, duration_fs: float = 2000.0):
    """Conserved-quantity drift (meV/ps, fitted) and std of H + PV (meV), 108 LJ atoms."""
    T = T_RED * EPS_K
    system = System.from_atoms(_boxes(RHO0, 1, size=3, seed=5, jitter=0.1))
    MaxwellBoltzmann(T, remove_translation=False)(system, torch.Generator().manual_seed(1))
    calc = BundleCalculator(bundle, stress=True)
    _melt(system, calc, T, 30)
    tau = 200.0 if kind == "scr" else 300.0
    baro = make_barostat(kind, p_eos_red(RHO0) * P_RED_TO_BAR, T, tau, 1.7e-4)
    integ, thermo = integrator_and_thermostat(kind, baro, dt_fs, T, 200.0)
    sim = Simulator(system, integ, calc, hooks=[thermo, baro], seed=2)
    to_meV = units.factor("Hartree", "eV") * 1e3
    t, c, h = [], [], []
    every = max(1, int(20 / dt_fs))
    for _ in range(int(duration_fs / dt_fs / every)):
        sim.simulate(every)
        t.append(sim.time_fs / 1000)
        c.append(float(sim.conserved_energy().sum()) * to_meV)
        h.append(float((system.kinetic_energy() + system.energy).sum() + baro.extended_energy(system).sum()) * to_meV)
    return float(np.polyfit(t, c, 1)[0]), float(np.std(h))


def skin_timing(bundle, skin: float, n_steps: int):
    """ms per MTK step (108 LJ atoms) and the list's rebuild fraction."""
    T = T_RED * EPS_K
    system = System.from_atoms(_boxes(RHO0, 1, size=3, seed=6, jitter=0.1))
    MaxwellBoltzmann(T, remove_translation=False)(system, torch.Generator().manual_seed(1))
    calc = BundleCalculator(bundle, stress=True, skin_angstrom=skin)
    baro = make_barostat("mtk", p_eos_red(RHO0) * P_RED_TO_BAR, T, 100.0, 1.7e-4)
    integ, thermo = integrator_and_thermostat("mtk", baro, 10.0, T, 100.0)
    sim = Simulator(system, integ, calc, hooks=[thermo, baro], seed=3)
    sim.simulate(20)
    nl = calc.provider.neighbors
    b0, c0 = (nl.n_builds, nl.n_calls) if nl is not None and hasattr(nl, "n_builds") else (0, 0)
    t0 = time.perf_counter()
    sim.simulate(n_steps)
    ms = (time.perf_counter() - t0) / n_steps * 1e3
    frac = (nl.n_builds - b0) / (nl.n_calls - c0) if hasattr(nl, "n_builds") else 1.0
    return ms, frac


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="shorter runs (smoke test, not for results)")
    ap.add_argument("--out", default=str(HERE / "results"))
    ap.add_argument("--seed", type=int, default=0, help="seed of the LJ density runs")
    args = ap.parse_args()
    torch.set_num_threads(1)
    q = args.quick
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="npt_bench_"))
    bundle = reference_bundle("lj", tmp / "lj.bundle", sigma=SIGMA_A, epsilon=EPS_EV, cutoff=RC * SIGMA_A)
    load_before = Path("/proc/loadavg").read_text().split()[:3]
    t_start = time.time()
    dt_ps = 12.0 / 1000
    n_eq, n_prod, n_per = (60, 60, 2) if q else (200, 600, 8)

    dens, traces = {}, {}
    kT_A3 = T_RED * EPS_K * units.KB_EV_PER_K * units.factor("eV/Angstrom^3", "bar")  # k_BT in bar·Å³
    kappa = kappa_T_eos_per_bar(RHO0)
    for kind in KINDS:
        print(f"density runs: {kind}", flush=True)
        rho, vols = lj_density_run(bundle, kind, n_per, n_eq, n_prod, seed=args.seed)
        traces[kind] = rho
        prod, vprod = rho[n_eq:], vols[n_eq:]
        row = []
        for g in (slice(0, n_per), slice(n_per, 2 * n_per)):
            bm = prod[:, g].mean(0)
            row.append((bm.mean(), bm.std(ddof=1) / math.sqrt(n_per)))
        # volume fluctuation of each box about its own mean, against k_BT <V> κ_T of the EOS
        v_box_var = vprod.var(0)
        ratio = v_box_var / (kT_A3 * vprod.mean(0) * kappa)
        dens[kind] = (row, float(ratio.mean()), float(ratio.std(ddof=1) / math.sqrt(len(ratio))))

    print("ideal gas", flush=True)
    ig = {k: ideal_gas_run(k, 64 if q else 128, 150 if q else 1000) for k in ["mtk", "pile", "pile_rpmd", "scr"]}

    print("drift", flush=True)
    drift = {}
    for kind, dt in [("scr", 2.5), ("scr", 5.0), ("scr", 10.0), ("mtk", 5.0)]:
        drift[(kind, dt)] = drift_run(bundle, kind, dt, 600.0 if q else 2000.0)

    print("skin timing", flush=True)
    reps = 3
    timing = {1.0: [], 0.0: []}
    fracs = {1.0: [], 0.0: []}
    for _ in range(reps):  # interleaved A B A B
        for skin in (1.0, 0.0):
            ms, fr = skin_timing(bundle, skin, 30 if q else 150)
            timing[skin].append(ms)
            fracs[skin].append(fr)
    load_after = Path("/proc/loadavg").read_text().split()[:3]

    # ---- plot
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(KINDS), figsize=(14, 3.4), sharey=True)
    for ax, kind in zip(axes, KINDS):
        rho = traces[kind]
        t = np.arange(1, len(rho) + 1) * dt_ps
        for b in range(rho.shape[1]):
            ax.plot(t, rho[:, b], lw=0.5, color="C0" if b < n_per else "C3", alpha=0.35)
        ax.plot(t, rho[:, :n_per].mean(1), color="C0", lw=1.8, label="from 0.9 ρ*")
        ax.plot(t, rho[:, n_per:].mean(1), color="C3", lw=1.8, label="from 1.1 ρ*")
        ax.axhline(RHO0, color="k", ls="--", lw=1, label="EOS (JZG)")
        ax.axvline(n_eq * dt_ps, color="grey", ls=":", lw=1)
        ax.set_title(kind)
        ax.set_xlabel("time (ps)")
    axes[0].set_ylabel("ρ* (29-atom boxes)")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "npt.png", dpi=90)

    # ---- table
    worst = max(abs(m / RHO0 - 1) * 100 for kind in KINDS for m, _ in dens[kind][0])
    fmt_e = lambda m, e: f"{m:.4f} ± {e:.4f}"  # noqa: E731
    lines = [
        "# NPT validation: density convergence, volume fluctuations, SCR effective energy, skin list",
        "",
        "Command: `.venv/bin/python benchmarks/npt.py`" + (" --quick (smoke run, not results)" if q else "")
        + (f" --seed {args.seed}" if args.seed else ""),
        f"torch {torch.__version__}, 1 thread, {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"wall {time.time() - t_start:.0f} s.",
        f"/proc/loadavg before: {' '.join(load_before)}, after: {' '.join(load_after)} (2 shared cores).",
        "",
        "## Density from ±10 % off (LJ, T* = 2, P* = P_JZG(0.8) − tail, 29-atom boxes, 12 fs steps)",
        "",
        f"{n_per} boxes start at 0.72 and {n_per} at 0.88 (ρ*), all in one batch with their own cells; melted 30+10 steps",
        f"at constant volume, then {n_eq} NPT steps ({n_eq * dt_ps:.1f} ps) discarded and {n_prod} ({n_prod * dt_ps:.1f} ps)",
        "averaged. Error: spread of the box means / √n. Plot: `results/npt.png` (thin: boxes, thick: group means).",
        "",
        "| barostat | τ_p (fs) | ⟨ρ*⟩ from 0.72 | ⟨ρ*⟩ from 0.88 | EOS | ⟨δV²⟩ / (k_BT ⟨V⟩ κ_T,EOS) |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for kind in KINDS:
        (a, b), r, re = dens[kind]
        lines.append(f"| {kind} | {TAU[kind]:g} | {fmt_e(*a)} | {fmt_e(*b)} | {RHO0} | {r:.2f} ± {re:.2f} |")
    lines += [
        "",
        f"κ_T,EOS = {kappa:.3e} /bar from a central difference of the JZG EOS (with the tail term) at ρ* = 0.8.",
        f"Largest deviation of a group mean from the EOS density: {worst:.1f} %; a frozen cell would stay at 0.72 / 0.88.",
        "29 atoms (32-site FCC minus 3): 32-atom boxes fit FCC, recrystallise near ρ* ≈ 0.87 and need ≳ 5 ps to",
        "come back to the fluid density (seen with the first version of this benchmark).",
        "The fluctuation ratio compares 29-atom boxes with the large-system κ_T (finite size) and carries the",
        "time-step error of the barostat (it grew to 1.35 for MTK with τ_p = 100 fs, volume period ≈ 8 steps).",
        "These ratios scatter by about ±0.15 between seeds, more than the quoted errors (16 boxes × 7 ps):",
        "a rerun of the LJ part with seed 7 gave MTK 0.93 ± 0.08, SCR 0.90 ± 0.05 (pooled over boxes 1.07, 1.04).",
        "The exact fluctuation check is the ideal gas below.",
        "",
        "## Ideal gas: exact volume distribution (16 atoms, 300 K, ⟨V⟩ = 1000 Å³, κ_T = 1/P)",
        "",
        f"{64 if q else 128} boxes started at ±10 % of ⟨V⟩, {150 if q else 1000} steps after 120 of equilibration;",
        "exact: ⟨V⟩ = (N+1) k_BT/P, ⟨δV²⟩ = (N+1)(k_BT/P)² = k_BT ⟨V⟩ κ_T.",
        "",
        "| barostat | ⟨V⟩ / exact | ⟨δV²⟩ / exact |",
        "| --- | --- | --- |",
    ]
    for k, (m, me, v, ve) in ig.items():
        lines.append(f"| {k} | {fmt_e(m, me)} | {v:.3f} ± {ve:.3f} |")
    lines += [
        "",
        "## Conserved (effective) energy drift, 108 LJ atoms, Langevin thermostat on the atoms",
        "",
        "| barostat | Δt (fs) | drift (meV/ps, fitted) | std of H + PV (meV) |",
        "| --- | --- | --- | --- |",
    ]
    for (kind, dt), (d, s) in drift.items():
        lines.append(f"| {kind} | {dt:g} | {d:.2f} | {s:.0f} |")
    lines += [
        "",
        "Before this change (first-order bookkeeping of the rescaling work) an SCR run of the same 108-atom",
        "system at 5 fs (τ_p 200 fs, Langevin 200 fs, 2 ps) drifted +531 meV/ps with the parent commit's barostat",
        "(one-off measurement, not produced by this script); the drift now shrinks with Δt.",
        "",
        "## Skin neighbor list in NPT (MTK, 108 LJ atoms, 10 fs, cell moves every step)",
        "",
        f"Interleaved, {reps} repeats of {30 if q else 150} steps each; median (min–max).",
        "",
        "| list | ms / step | rebuild fraction |",
        "| --- | --- | --- |",
    ]
    for skin in (1.0, 0.0):
        v = timing[skin]
        name = f"skin {skin:g} Å (strain-aware)" if skin else "no skin (full list every step)"
        lines.append(f"| {name} | {statistics.median(v):.2f} ({min(v):.2f}–{max(v):.2f}) | {statistics.median(fracs[skin]):.2f} |")
    lines += [
        "",
        "Before the strain-aware criterion every step with a changed cell rebuilt (fraction 1.00 with any skin).",
    ]
    (out / "npt.md").write_text("\n".join(lines) + "\n")
    shutil.rmtree(tmp, ignore_errors=True)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
