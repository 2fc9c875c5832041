"""The ``spkmd`` command."""

import click


@click.group()
def main() -> None:
    """Molecular dynamics with bundles and other force providers."""
