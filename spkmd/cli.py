"""The ``spkmd`` command (click, thin over :mod:`spkmd.run`, :mod:`spkmd.data`, :mod:`spkmd.plotting`).

    spkmd simulation_dir=DIR [overrides...]        run (or restart) a simulation
    spkmd run simulation_dir=DIR [overrides...]    the same
    spkmd plot DIR                                 PNGs of energies, temperature, pressure
    spkmd export DIR -o frames.extxyz              frames to extended XYZ
    spkmd spectrum DIR --ir --raman [-o spectra.png]   power / IR / Raman spectra (PNG + CSV)
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from spkserve.allocator import tuned_entry

_SUBCOMMANDS = ("run", "plot", "export", "spectrum")


class _DefaultRunGroup(click.Group):
    """A group whose default command is ``run``: ``spkmd key=value ...`` == ``spkmd run key=value ...``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["run", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultRunGroup)
@click.version_option(package_name="spk-toolkit")
def main() -> None:
    """Molecular dynamics with model bundles and other force providers.

    Without a subcommand, the arguments are hydra overrides of the run command,
    e.g. ``spkmd simulation_dir=runs/etoh dynamics.n_steps=1000 +dynamics/thermostat=nhc``.
    """


def _fail(err: Exception) -> None:
    raise click.ClickException(str(err)) from err


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--config", "config_file", type=click.Path(dir_okay=False), help="Load a saved config (e.g. DIR/config.yaml); key=value overrides still apply.")
@click.option("--config-dir", type=click.Path(file_okay=False), help="Extra directory with config groups (searched before the shipped ones).")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
@click.option("--cfg", "-c", "cfg_kind", type=click.Choice(["job", "all", "hydra"]), default=None,
              help="SchNetPack/hydra spelling: --cfg job (or all) prints the resolved config and exits.")
def run(overrides: tuple[str, ...], config_file: str | None, config_dir: str | None, print_config: bool,
        cfg_kind: str | None) -> None:
    """Run or restart a simulation (overrides: key=value, group=option, +group=option, ~key;
    SchNetPack spellings such as +dynamics/thermostat=pi_nhc_local or load_config=FILE work too)."""
    if cfg_kind == "hydra":
        raise click.UsageError("spkmd composes with hydra's Compose API and has no hydra section; use --cfg job")
    print_config = print_config or cfg_kind is not None
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from spkmd.run import load_config, run_simulation

    try:
        cfg = load_config(overrides, config_file=config_file, config_dir=config_dir)
        if print_config:
            click.echo(OmegaConf.to_yaml(cfg, resolve=True))
            return
        run_simulation(cfg)
    except (ValueError, FileNotFoundError, KeyError, RuntimeError, OmegaConfBaseException) as err:
        _fail(err)


def _log_file(directory: str) -> Path:
    p = Path(directory)
    if p.is_file():
        return p
    f = p / "simulation.hdf5"
    if not f.is_file():
        raise click.ClickException(f"no simulation log at {f}")
    return f


@main.command()
@click.argument("directory", type=click.Path(exists=True))
@click.option("-o", "--out", "out_dir", type=click.Path(file_okay=False), help="Output directory (default DIR/plots).")
@click.option("--molecule", type=int, default=None, help="Only this molecule.")
def plot(directory: str, out_dir: str | None, molecule: int | None) -> None:
    """PNG plots of energies, temperature and pressure of a run."""
    from spkmd.plotting import plot_log

    log = _log_file(directory)
    out = Path(out_dir) if out_dir else log.parent / "plots"
    try:
        for f in plot_log(log, out, molecule):
            click.echo(str(f))
    except (ValueError, KeyError, IndexError) as err:
        _fail(err)


@main.command()
@click.argument("directory", type=click.Path(exists=True))
@click.option("-o", "--out", "out_file", required=True, type=click.Path(dir_okay=False), help="Extended XYZ file.")
@click.option("--replica", type=int, default=None, help="Export this replica (default: centroid).")
@click.option("--centroid", is_flag=True, help="Export the centroid (mean over replicas; the default).")
@click.option("--molecule", type=int, default=None, help="Only this molecule (default: all).")
@click.option("--every", type=int, default=1, show_default=True, help="Every n-th logged frame.")
def export(directory: str, out_file: str, replica: int | None, centroid: bool, molecule: int | None, every: int) -> None:
    """Export logged frames (positions, momenta, cell, energy, forces) to extended XYZ."""
    from spkmd.data import HDF5Loader

    if centroid and replica is not None:
        raise click.UsageError("give --replica K or --centroid, not both")
    try:
        n = HDF5Loader(_log_file(directory)).write_extxyz(out_file, molecule=molecule, replica=replica, every=every)
    except (ValueError, KeyError, IndexError) as err:
        _fail(err)
    click.echo(f"wrote {n} frames to {out_file}")


@main.command()
@click.argument("directory", type=click.Path(exists=True))
@click.option("-o", "--out", "out_file", type=click.Path(dir_okay=False),
              help="PNG file (default: spectra.png beside the log); the numbers go to the same name with .csv.")
@click.option("--power", "want_power", is_flag=True, help="Power spectrum (velocity autocorrelation).")
@click.option("--ir", "want_ir", is_flag=True, help="IR spectrum (needs dipole_moment in the log).")
@click.option("--raman", "want_raman", is_flag=True, help="Raman spectra (needs polarizability in the log).")
@click.option("--kind", type=click.Choice(["power", "ir", "raman"]), default=None,
              help="One spectrum (older spelling of --power/--ir/--raman).")
@click.option("--molecule", type=int, default=0, show_default=True)
@click.option("--replica", type=int, default=None, help="One bead (default: the bead average = centroid).")
@click.option("--skip", type=int, default=0, show_default=True, help="Logged frames to skip (equilibration).")
@click.option("--skip-ps", type=float, default=None, help="Skip this much simulated time (ps) instead.")
@click.option("--resolution", type=int, default=None, help="Correlation length in frames (default: half the frames, at most 4096).")
@click.option("--laser-nm", type=float, default=514.0, show_default=True, help="Raman laser wavelength.")
@click.option("--temperature-K", "temperature_K", type=float, default=None,
              help="Temperature of the quantum/Bose factors (default: mean logged temperature).")
@click.option("--correction", type=click.Choice(["harmonic", "schofield"]), default="harmonic", show_default=True,
              help="Quantum correction of the IR line shape.")
def spectrum(directory: str, out_file: str | None, want_power: bool, want_ir: bool, want_raman: bool,
             kind: str | None, molecule: int, replica: int | None, skip: int, skip_ps: float | None,
             resolution: int | None, laser_nm: float, temperature_K: float | None, correction: str) -> None:
    """Power, IR and Raman spectra from the HDF5 log: a PNG with one panel each and a CSV of the numbers."""
    from spkmd.spectra import compute_spectra

    kinds = [k for k, on in (("power", want_power), ("ir", want_ir), ("raman", want_raman)) if on]
    if kind and kind not in kinds:
        kinds.append(kind)
    log = _log_file(directory)
    png = Path(out_file) if out_file else log.parent / "spectra.png"
    try:
        files, info = compute_spectra(
            log, png, kinds=kinds or ["power"], molecule=molecule, replica=replica, skip_frames=skip,
            skip_ps=skip_ps, resolution=resolution, laser_nm=laser_nm, temperature_K=temperature_K,
            correction=correction,
        )
    except (ValueError, KeyError, IndexError) as err:
        _fail(err)
    click.echo(info)
    for f in files:
        click.echo(f"wrote {f}")


#: console-script entry point: the allocator tunable (spkserve.allocator), then :func:`main`
entry = tuned_entry(main, light=("plot", "export", "spectrum"))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(entry())
