"""The ``spktrain`` command."""

import click


@click.group()
def main() -> None:
    """Train models and export them as bundles."""
