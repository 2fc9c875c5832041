"""``spkserve ipi`` (client role) and ``spkserve ipi-server`` (server role)."""

from __future__ import annotations

import logging

import click


def _species(template: str | None, species: str | None) -> list[int]:
    from spkserve.ipi.evaluate import species_from_symbols, species_from_template

    if (template is None) == (species is None):
        raise click.UsageError("give exactly one of --template FILE or --species C,H,O (i-PI never sends species)")
    try:
        return species_from_template(template) if template else species_from_symbols(species)
    except (ValueError, OSError) as err:
        raise click.UsageError(str(err)) from err


def _address(unix: str | None, host: str | None, port: int | None):
    from spkserve.ipi.client import Address

    if (unix is None) == (port is None):
        raise click.UsageError("give exactly one of --unix NAME or --port N (with --host, default 127.0.0.1)")
    return Address.unix(unix) if unix else Address.tcp(host or "127.0.0.1", port)


@click.command("ipi")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--unix", help="unix socket name (i-PI's NAME -> /tmp/ipi_NAME) or a full path")
@click.option("--host", default=None, help="TCP host of the i-PI server (default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="TCP port of the i-PI server")
@click.option("--template", type=click.Path(exists=True, dir_okay=False), help="structure file giving the species")
@click.option("--species", help="species in order, e.g. C,C,O,H,H,H,H,H,H")
@click.option("--workers", type=int, default=1, show_default=True, help="connections from this process")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, help="evaluation precision")
@click.option("--device", default="cpu", show_default=True)
@click.option("--pbc", type=click.Choice(["auto", "yes", "no"]), default="auto", show_default=True,
              help="auto: periodic when the cell sent by the server is non-singular")
@click.option("--connect-timeout", type=float, default=60.0, show_default=True, help="seconds to retry connecting")
@click.option("--gather-ms", type=float, default=2.0, show_default=True,
              help="with --workers > 1: wait this long for requests of one step to batch them")
@click.option("-v", "--verbose", is_flag=True)
def ipi(bundle, unix, host, port, template, species, workers, dtype, device, pbc, connect_timeout, gather_ms, verbose):
    """Answer an i-PI server (or ASE's SocketIOCalculator) with BUNDLE."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="spkserve ipi: %(message)s")
    numbers = _species(template, species)
    address = _address(unix, host, port)
    from spkserve.bundle import BundleError
    from spkserve.ipi.client import ClientError, run_client
    from spkserve.provider import ProviderError
    from spkserve.ensemble import EnsembleError, open_runner

    try:
        runner = open_runner(bundle, dtype=dtype, device=device)
        run_client(
            runner, numbers, address, workers=workers, pbc={"auto": "auto", "yes": True, "no": False}[pbc],
            connect_timeout_s=connect_timeout, gather_window_s=gather_ms * 1e-3,
        )
    except (ClientError, ProviderError, BundleError, EnsembleError) as err:
        raise click.ClickException(str(err)) from err


@click.command("ipi-server")
@click.option("--unix", help="unix socket name (NAME -> /tmp/ipi_NAME) or a full path")
@click.option("--host", default=None, help="TCP host (loopback only; default 127.0.0.1)")
@click.option("--port", type=int, default=None, help="TCP port")
@click.option("--structure", "structure_file", type=click.Path(exists=True, dir_okay=False), required=True,
              help="structure (Å) to send to the connected drivers")
@click.option("--timeout", type=float, default=60.0, show_default=True, help="seconds to wait for a driver")
@click.option("--steps", type=int, default=1, show_default=True, help="evaluations to run")
def ipi_server(unix, host, port, structure_file, timeout, steps):
    """Wait for an i-PI driver (i-pi-py_driver, ASE SocketClient, LAMMPS fix ipi) and print its energies and forces.

    The main use of the server role is as a force provider for spkmd
    (``spkserve.ipi.server.provider_from_config``); this command checks a driver works.
    """
    logging.basicConfig(level=logging.INFO, format="spkserve ipi-server: %(message)s")
    import numpy as np
    from ase.io import read

    from spkserve.batch import Structure
    from spkserve.ipi.server import IPIServerProvider
    from spkserve.provider import ProviderError

    atoms = read(structure_file)
    address = _address(unix, host, port)
    provider = IPIServerProvider(
        unix=address.unix_path, host=address.host, port=address.port, n_atoms=len(atoms), timeout_s=timeout
    )
    try:
        for step in range(steps):
            out = provider.compute([Structure.from_atoms(atoms)], ("energy", "forces"))
            f = out["forces"].numpy()
            click.echo(f"step {step}: energy {float(out['energy'][0]):.10f} eV, max |F| {np.abs(f).max():.6f} eV/Å")
    except ProviderError as err:
        raise click.ClickException(str(err)) from err
    finally:
        provider.close()
