"""``spkserve info``, ``spkserve verify`` and ``spkserve reference``."""

from __future__ import annotations

import json
from pathlib import Path

import click

from spkserve.bundle import BundleError


def _fail(err: Exception) -> None:
    raise click.ClickException(str(err))


@click.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Print the full metadata as JSON.")
def info(bundle: str, as_json: bool) -> None:
    """Describe a model bundle: species, cutoff, units, outputs, provenance."""
    from spkserve.bundle import describe, read_bundle

    try:
        if as_json:
            c = read_bundle(bundle)
            click.echo(json.dumps({"format_version": c.format_version, "metadata": c.metadata, "architecture": c.architecture}, indent=2, sort_keys=True))
        else:
            click.echo(describe(bundle))
    except BundleError as err:
        _fail(err)


@click.command()
@click.argument("bundle", type=click.Path(dir_okay=False))
@click.option("--upgrade", is_flag=True, help="Rewrite an older-format bundle in the current format.")
def verify(bundle: str, upgrade: bool) -> None:
    """Check a bundle: format, integrity hash, architecture, weights."""
    from spkserve.bundle import FORMAT_VERSION, load_bundle, read_bundle, write_bundle

    try:
        c = read_bundle(bundle)
        loaded = load_bundle(bundle)
        if upgrade and c.format_version != FORMAT_VERSION:
            write_bundle(bundle, loaded.model, c.metadata, architecture=c.architecture)
            click.echo(f"{bundle}: upgraded from format v{c.format_version} to v{FORMAT_VERSION}")
        click.echo(f"{bundle}: OK (format v{c.format_version}, architecture {c.architecture['name']})")
    except BundleError as err:
        _fail(err)


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
            raise click.BadParameter(f"unknown element {tok!r}")
    return out


@click.group()
def reference() -> None:
    """Write bundles of analytic reference potentials (Å, eV)."""


_common = [
    click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Bundle file to write."),
    click.option("--species", default=None, help="Elements allowed, e.g. 'Ar' or 'C,H,O' (default: all)."),
    click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float64"),
]


def _with_common(f):
    for opt in reversed(_common):
        f = opt(f)
    return f


@reference.command("lj")
@click.option("--sigma", type=float, default=3.4, show_default=True, help="σ in Å.")
@click.option("--epsilon", type=float, default=0.0104, show_default=True, help="ε in eV.")
@click.option("--cutoff", type=float, default=None, help="Cutoff in Å (default 3σ); energy shifted to zero there.")
@_with_common
def lj(sigma, epsilon, cutoff, output, species, dtype) -> None:
    """Lennard-Jones, shifted like ASE's LennardJones(sigma, epsilon, rc)."""
    from spkserve.potentials import reference_bundle

    path = reference_bundle("lj", output, species=_species(species), dtype=dtype, sigma=sigma, epsilon=epsilon, cutoff=cutoff)
    click.echo(f"wrote {path}")


@reference.command("morse")
@click.option("--depth", type=float, required=True, help="Well depth D in eV.")
@click.option("--alpha", type=float, required=True, help="Width a in 1/Å.")
@click.option("--r0", type=float, required=True, help="Equilibrium distance in Å.")
@click.option("--cutoff", type=float, required=True, help="Cutoff in Å.")
@_with_common
def morse(depth, alpha, r0, cutoff, output, species, dtype) -> None:
    """Morse pair potential, shifted to zero at the cutoff."""
    from spkserve.potentials import reference_bundle

    path = reference_bundle("morse", output, species=_species(species), dtype=dtype, depth=depth, alpha=alpha, r0=r0, cutoff=cutoff)
    click.echo(f"wrote {path}")


@reference.command("harmonic")
@click.option("--trap", is_flag=True, help="Isotropic trap: every atom tied to a fixed centre.")
@click.option("--k", "k", type=float, required=True, help="Force constant in eV/Å².")
@click.option("--centre", default="0,0,0", show_default=True, help="Trap centre in Å (x,y,z).")
@click.option("--molecule", type=click.Path(exists=True, dir_okay=False), default=None,
              help="Bonds mode: structure file whose bonds (1.2× covalent radii) become springs at their current lengths.")
@_with_common
def harmonic(trap, k, centre, molecule, output, species, dtype) -> None:
    """Harmonic trap (--trap) or springs between the bonded atoms of --molecule."""
    from spkserve.potentials import reference_bundle

    if trap == bool(molecule):
        raise click.UsageError("give exactly one of --trap or --molecule FILE")
    if trap:
        c = [float(x) for x in centre.split(",")]
        if len(c) != 3:
            raise click.BadParameter("--centre needs three numbers x,y,z")
        path = reference_bundle("harmonic_trap", output, species=_species(species), dtype=dtype, k=k, centre=c)
    else:
        import ase.io
        import numpy as np
        from ase.neighborlist import natural_cutoffs, neighbor_list

        atoms = ase.io.read(molecule)
        i, j, d = neighbor_list("ijd", atoms, natural_cutoffs(atoms, mult=1.2))
        keep = i < j
        bonds = np.stack([i[keep], j[keep]], 1).tolist()
        path = reference_bundle(
            "harmonic_bonds", output, species=_species(species) or sorted(set(atoms.numbers.tolist())), dtype=dtype,
            bonds=bonds, k=k, r0=d[keep].tolist(), n_atoms=len(atoms),
        )
    click.echo(f"wrote {path}")
