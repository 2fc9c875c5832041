"""PNG plots of a simulation log: energies, temperature, pressure over time."""

from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_log(log_file: str | Path, out_dir: str | Path, molecule: int | None = None) -> list[Path]:
    """Write ``energies.png``, ``temperature.png`` (and ``pressure.png`` if logged) into ``out_dir``.

    Each molecule (centroid over replicas) is one line; ``molecule`` restricts to one.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from spkmd.data import HDF5Loader

    log = HDF5Loader(log_file)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t = log.times_fs
    mols = range(log.n_molecules) if molecule is None else [molecule]
    written = []

    fig, axes = plt.subplots(3, 1, figsize=(7, 8), sharex=True)
    for m in mols:
        epot = log.get_potential_energy(m)
        ekin = log.get_property("kinetic_energy", m)
        econs = log.get_property("conserved_energy", m)
        label = f"molecule {m}"
        axes[0].plot(t, epot - epot[0], label=label)
        axes[1].plot(t, ekin, label=label)
        axes[2].plot(t, econs - econs[0], label=label)
    axes[0].set_ylabel("E_pot - E_pot(0) / eV")
    axes[1].set_ylabel("E_kin / eV")
    axes[2].set_ylabel("E_conserved - E(0) / eV")
    axes[2].set_xlabel("time / fs")
    if len(mols) <= 10:
        axes[0].legend(fontsize="small")
    fig.tight_layout()
    written.append(out / "energies.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(7, 4))
    for m in mols:
        T = log.get_temperature(m)
        ax.plot(t, T, label=f"molecule {m}", lw=0.8)
    T_all = log.get_property("temperature", None)  # [T, M]
    ax.axhline(float(np.mean(T_all)), color="k", ls="--", lw=0.8, label=f"mean {float(np.mean(T_all)):.1f} K")
    ax.set_xlabel("time / fs")
    ax.set_ylabel(f"temperature / K ({log.temperature_estimator})")
    ax.legend(fontsize="small")
    fig.tight_layout()
    written.append(out / "temperature.png")
    fig.savefig(written[-1], dpi=100)
    plt.close(fig)

    if "pressure" in log.available:
        fig, ax = plt.subplots(figsize=(7, 4))
        for m in mols:
            ax.plot(t, log.get_pressure(m), label=f"molecule {m}", lw=0.8)
        ax.set_xlabel("time / fs")
        ax.set_ylabel("pressure / bar")
        ax.legend(fontsize="small")
        fig.tight_layout()
        written.append(out / "pressure.png")
        fig.savefig(written[-1], dpi=100)
        plt.close(fig)
    return written
