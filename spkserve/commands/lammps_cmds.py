"""``spkserve lammps IN.lmp --model BUNDLE --types C H O``."""

from __future__ import annotations

import click


@click.command("lammps")
@click.argument("input_script", type=click.Path(exists=True, dir_okay=False))
@click.option("--model", "model", required=True, type=click.Path(exists=True, dir_okay=False), help="bundle file")
@click.option("--types", required=True, multiple=True,
              help="element of LAMMPS atom types 1, 2, ... (e.g. --types C H O or --types C,H,O)")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, help="evaluation precision")
@click.option("--device", default="cpu", show_default=True)
@click.option("--log", "log_file", default="log.lammps", show_default=True, help="LAMMPS log file ('none' for no log)")
@click.option("-var", "--var", "variables", nargs=2, multiple=True, metavar="NAME VALUE",
              help="LAMMPS variable definition (like lmp -var NAME VALUE)")
def lammps(input_script, model, types, dtype, device, log_file, variables):
    """Run LAMMPS on INPUT_SCRIPT with forces from a bundle (fix external pf/callback).

    The script sets up units (metal, real or electron), box, atoms, integrator and run;
    spkserve adds the fix external before the first run/minimize.
    """
    from spkserve.lammps import LammpsError, run_lammps

    names = [t for item in types for t in item.replace(",", " ").split()]
    try:
        lmp, callback = run_lammps(
            input_script, model, names, dtype=dtype, device=device, cmdargs=["-log", log_file],
            variables=dict(variables),
        )
    except LammpsError as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"spkserve lammps: {callback.calls} force evaluations, final energy {callback.energy:.10g} "
               f"({callback.units_style} units)", err=True)
    lmp.close()
