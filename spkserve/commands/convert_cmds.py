"""``spkserve convert schnetpack MODEL_FILE -o BUNDLE``: import other codes' trained models."""

from __future__ import annotations

import click


@click.group("convert")
def convert() -> None:
    """Convert a model trained with another code into a bundle."""


def _species(text: str | None) -> list[int] | None:
    if not text:
        return None
    from ase.data import atomic_numbers

    out = []
    for tok in text.replace(",", " ").split():
        if tok.isdigit():
            out.append(int(tok))
        elif tok in atomic_numbers:
            out.append(atomic_numbers[tok])
        else:
            raise click.BadParameter(f"{tok!r} is neither an element symbol nor an atomic number", param_hint="--species")
    return out


@convert.command("schnetpack")
@click.argument("model_file", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="bundle file to write")
@click.option("--energy-unit", default=None,
              help="unit of the model's energies (default: from the run's config.yaml beside MODEL_FILE)")
@click.option("--length-unit", default=None, help="unit of positions (default: run config's distance_unit, else Ang)")
@click.option("--species", default=None, help="elements the bundle admits, e.g. 'H,C,O' or '1 6 8' (default: all the embedding covers)")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, help="weight precision (default: as in the file)")
@click.option("--energy-key", default=None, help="SchNetPack output key of the energy (default: the one Forces differentiates)")
def schnetpack(model_file, output, energy_unit, length_unit, species, dtype, energy_key) -> None:
    """Convert a SchNetPack 2.x model file (best_model, a pickled NeuralNetworkPotential)
    into a bundle. The pickle is read with a restricted unpickler: no code from the
    file runs, and SchNetPack need not be installed. Meant for your own model files."""
    from spkserve.bundle import describe
    from spkserve.convert.torch_pickle import ModelFileError
    from spkserve.convert.schnetpack_model import convert_schnetpack

    try:
        path = convert_schnetpack(model_file, output, energy_unit=energy_unit, length_unit=length_unit,
                                  species=_species(species), dtype=dtype, energy_key=energy_key)
    except ModelFileError as err:
        raise click.ClickException(str(err)) from err
    click.echo(describe(path))
