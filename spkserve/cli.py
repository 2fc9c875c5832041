"""The ``spkserve`` command: a thin click layer over importable functions.

Subcommands live in their own modules and are imported only when invoked, so
``spkserve --help`` stays fast. Add a command by listing it in ``_COMMANDS``.
"""

from __future__ import annotations

import importlib

import click

from spkserve.allocator import tuned_entry

# name -> "module:attribute" of a click.Command
_COMMANDS: dict[str, str] = {
    "info": "spkserve.commands.bundle_cmds:info",
    "reference": "spkserve.commands.bundle_cmds:reference",
    "verify": "spkserve.commands.bundle_cmds:verify",
    "ipi": "spkserve.commands.ipi_cmds:ipi",
    "ipi-server": "spkserve.commands.ipi_cmds:ipi_server",
    "serve": "spkserve.commands.serve_cmds:serve",
    "lammps": "spkserve.commands.lammps_cmds:lammps",
    "convert": "spkserve.commands.convert_cmds:convert",
}


class _LazyGroup(click.Group):
    def list_commands(self, ctx: click.Context) -> list[str]:
        from importlib.util import find_spec

        return sorted(n for n, t in _COMMANDS.items() if find_spec(t.split(":")[0]) is not None)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        target = _COMMANDS.get(name)
        if target is None:
            return None
        module, attr = target.split(":")
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError as err:
            if err.name == module:
                raise click.ClickException(f"command {name!r} is not available in this installation") from err
            raise
        return getattr(mod, attr)


@click.group(cls=_LazyGroup)
@click.version_option(package_name="spk-toolkit")
def main() -> None:
    """Model runtime and servers: inspect bundles, write reference potentials,
    serve models to i-PI, ASE and LAMMPS."""


#: console-script entry point: the allocator tunable (spkserve.allocator), then :func:`main`
entry = tuned_entry(main, light=("info", "reference", "verify", "convert"))
