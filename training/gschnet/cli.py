"""``gschnet_train``: thin click wrapper over :func:`training.gschnet.run.train_gschnet`.

    gschnet_train experiment=gschnet_qm9_gap_relenergy data.datapath=qm9.extxyz trainer.max_time=00:00:10:00
    gschnet_train experiment=gschnet_template data.datapath=my.db globals.atom_types="[1, 6, 8]" \\
        globals.model_cutoff=5 globals.prediction_cutoff=5 globals.placement_cutoff=1.7
    gschnet_train --config-dir my_configs experiment=mine model/conditioning=gap
    gschnet_train resume runs/gschnet_qm9_20261206-120000 [trainer.max_epochs=500]
"""

from __future__ import annotations

from pathlib import Path

import click

from spkserve.allocator import tuned_entry


class _DefaultTrainGroup(click.Group):
    """``gschnet_train experiment=x`` = ``gschnet_train train experiment=x``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultTrainGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train cG-SchNet generators (default subcommand: train)."""


def _run(cfg) -> None:
    from training.gschnet.run import train_gschnet
    from training.run import TrainingConfigError

    try:
        result = train_gschnet(cfg)
    except (TrainingConfigError, FileNotFoundError, ValueError) as err:
        raise click.ClickException(str(err)) from err
    click.echo(f"run directory: {result['run_dir']}")
    click.echo(f"generator bundle: {result['bundle']}")
    for k, v in result["metrics"].items():
        click.echo(f"  {k} = {v}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--config-dir", type=click.Path(file_okay=False), default=None,
              help="Extra directory of configs (experiment/, model/conditioning/; a gschnet.yaml replaces ours).")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
def train(overrides: tuple[str, ...], config_dir: str | None, print_config: bool) -> None:
    """Train with the config composed from OVERRIDES (key=value, group=option, +key=value)."""
    from training.config import ConfigError, resolve, to_yaml
    from training.gschnet.config import compose_gschnet_config

    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise click.UsageError(f"unknown option(s) {bad}; overrides look like key=value")
    try:
        cfg = compose_gschnet_config(overrides, config_dir)
        if print_config:
            click.echo(to_yaml(cfg))
            return
        cfg = resolve(cfg)
    except ConfigError as err:
        raise click.ClickException(str(err)) from err
    _run(cfg)


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def resume(run_dir: str, overrides: tuple[str, ...]) -> None:
    """Continue the run in RUN_DIR from its last checkpoint (OVERRIDES e.g. trainer.max_epochs=200)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise click.ClickException(f"{run_dir} has no config.yaml; is it a gschnet_train run directory?")
    cfg = OmegaConf.load(path)
    try:
        cfg.merge_with_dotlist(list(overrides))
    except Exception as err:  # omegaconf raises several error types for bad keys
        raise click.ClickException(f"cannot apply overrides {list(overrides)}: {err}") from err
    cfg.run.dir = str(Path(run_dir).resolve())
    cfg.run.resume = True
    _run(cfg)


entry = tuned_entry(main)

if __name__ == "__main__":
    entry()
