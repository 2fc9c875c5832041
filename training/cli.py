"""The ``spktrain`` command (thin click wrappers over :mod:`training.run`, ``.export``, ``.evaluate``).

    spktrain train experiment=md17 data.datapath=eth.db model/representation=painn globals.lr=1e-3
    spktrain experiment=ethanol_xtb              # "train" is the default subcommand
    spktrain train --print-config experiment=qm9 data.datapath=qm9.db
    spktrain resume runs/ethanol_xtb_20261122-011500 [trainer.max_epochs=100]
    spktrain export RUN_DIR -o model.bundle
    spktrain eval model.bundle data.extxyz [--split RUN_DIR/split.npz --subset test] [--plot parity.png]
    spktrain ensemble experiment=ethanol_xtb ensemble.n_models=4 [ensemble.bootstrap=true]
    spktrain active-learn configs/active_learning/ethanol_tblite.yaml [rounds=3 ...]
"""

from __future__ import annotations

from pathlib import Path

import click

from spkserve.allocator import tuned_entry


class _DefaultTrainGroup(click.Group):
    """A group whose default subcommand is ``train``: ``spktrain experiment=x`` = ``spktrain train experiment=x``."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if args and args[0] not in self.commands and args[0] not in ("--help", "-h", "--version"):
            args = ["train", *args]
        return super().parse_args(ctx, args)


@click.group(cls=_DefaultTrainGroup, context_settings={"help_option_names": ["-h", "--help"]})
def main() -> None:
    """Train models and export them as bundles.

    Without a subcommand the arguments go to ``train`` (``spktrain experiment=md17 ...``).
    """


def _fail(err: Exception) -> None:
    raise click.ClickException(str(err)) from err


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--config-dir", type=click.Path(file_okay=False), default=None,
              help="Extra directory of configs (its groups become selectable; a train.yaml there replaces ours).")
@click.option("--print-config", is_flag=True, help="Print the resolved config and exit.")
@click.option("--cfg", "-c", "cfg_kind", type=click.Choice(["job", "all", "hydra"]), default=None,
              help="SchNetPack/hydra spelling: --cfg job (or all) prints the resolved config and exits.")
def train(overrides: tuple[str, ...], config_dir: str | None, print_config: bool, cfg_kind: str | None) -> None:
    """Train with the config composed from OVERRIDES (key=value, group=option, +key=value, ~key;
    SchNetPack's model.representation.KEY=... and model/representation/radial_basis=... work too)."""
    from training.config import ConfigError, compose_config, resolve, to_yaml

    if cfg_kind == "hydra":
        raise click.UsageError("spktrain composes with hydra's Compose API and has no hydra section; use --cfg job")
    print_config = print_config or cfg_kind is not None

    bad = [o for o in overrides if o.startswith("-")]
    if bad:
        raise click.UsageError(f"unknown option(s) {bad}; overrides look like key=value")
    try:
        cfg = compose_config(overrides, config_dir)
        if print_config:
            click.echo(to_yaml(cfg))
            return
        cfg = resolve(cfg)
    except ConfigError as err:
        _fail(err)
    _run(cfg)


def _run(cfg) -> None:
    from training.run import TrainingConfigError, train as run_train

    try:
        result = run_train(cfg)
    except (TrainingConfigError, FileNotFoundError) as err:
        _fail(err)
    except ValueError as err:  # data errors raised by the data module name the problem
        _fail(err)
    click.echo(f"run directory: {result['run_dir']}")
    for k, v in sorted(result["test_metrics"].items()):
        click.echo(f"  {k} = {v:.6g}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
@click.option("--config-dir", type=click.Path(file_okay=False), default=None, help="Extra directory of configs.")
def ensemble(overrides: tuple[str, ...], config_dir: str | None) -> None:
    """Train a committee (ensemble.n_models=4 ensemble.bootstrap=false ensemble.seed=0 ensemble.dir=DIR)
    and write DIR/ensemble.json, which spkmd, spkserve and the ASE calculator take as one model."""
    from spkserve.bundle import BundleError
    from spkserve.ensemble import EnsembleError
    from training.config import ConfigError, compose_config, resolve
    from training.ensemble import split_overrides, train_ensemble
    from training.export import ExportError
    from training.run import TrainingConfigError

    try:
        opts, rest = split_overrides(overrides)
        cfg = resolve(compose_config(rest, config_dir))
        result = train_ensemble(cfg, opts, progress=click.echo)
    except (ConfigError, TrainingConfigError, ExportError, BundleError, EnsembleError, FileNotFoundError, ValueError) as err:
        _fail(err)
    click.echo(f"ensemble of {len(result['members'])} members: {result['manifest']}")


@main.command(name="active-learn")
@click.argument("config_file", type=click.Path(exists=True, dir_okay=False))
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def active_learn(config_file: str, overrides: tuple[str, ...]) -> None:
    """Run (or resume) the active-learning loop of CONFIG_FILE (see docs/active_learning.md)."""
    from training.active_learning import ActiveLearningError, load_config, run_loop

    try:
        cfg = load_config(config_file, overrides)
        result = run_loop(cfg, progress=click.echo)
    except (ActiveLearningError, FileNotFoundError, ValueError) as err:
        _fail(err)
    click.echo(f"round log: {result['log']}\nplot: {result['plot']}")


@main.command(context_settings={"ignore_unknown_options": True})
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.argument("overrides", nargs=-1, type=click.UNPROCESSED)
def resume(run_dir: str, overrides: tuple[str, ...]) -> None:
    """Continue the run in RUN_DIR from its last checkpoint (OVERRIDES e.g. trainer.max_epochs=200)."""
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise click.ClickException(f"{run_dir} has no config.yaml; is it a spktrain run directory?")
    cfg = OmegaConf.load(path)
    OmegaConf.set_struct(cfg, True)
    try:
        cfg.merge_with_dotlist(list(overrides))
    except Exception as err:  # omegaconf raises several error types for bad keys
        raise click.ClickException(f"cannot apply overrides {list(overrides)}: {err}") from err
    cfg.run.dir = str(Path(run_dir).resolve())
    cfg.run.resume = True
    _run(cfg)


@main.command()
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False))
@click.option("-o", "--output", "output", required=True, type=click.Path(dir_okay=False), help="Bundle file to write.")
@click.option("--checkpoint", default="best", show_default=True, help="best, last or a checkpoint path.")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
def export(run_dir: str, output: str, checkpoint: str, dtype: str) -> None:
    """Write the model of RUN_DIR (EMA weights if EMA was on) as a bundle."""
    from spkserve.bundle import BundleError
    from training.export import ExportError, export_run

    try:
        path = export_run(run_dir, output, checkpoint=checkpoint, dtype=dtype)
    except (ExportError, BundleError, FileNotFoundError) as err:
        _fail(err)
    click.echo(f"wrote {path}")


@main.command(name="eval")
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.argument("data", type=click.Path(exists=True, dir_okay=False))
@click.option("--split", "split_file", type=click.Path(exists=True, dir_okay=False), default=None,
              help="split.npz of a run: evaluate only its --subset.")
@click.option("--subset", type=click.Choice(["train", "val", "test"]), default="test", show_default=True)
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), default=None,
              help="Write a parity plot PNG to this path (none without it).")
@click.option("--batch-size", type=int, default=50, show_default=True)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, help="Evaluate in this dtype.")
def eval_cmd(bundle: str, data: str, split_file: str | None, subset: str, plot_path: str | None, batch_size: int,
             dtype: str | None) -> None:
    """Print MAE/RMSE of BUNDLE on DATA (in the bundle's units); with --plot, write a parity plot."""
    from spkserve.bundle import BundleError
    from training.evaluate import EvaluationError, evaluate_bundle, format_metrics, parity_plot

    try:
        result = evaluate_bundle(bundle, data, split_file=split_file, subset=subset, batch_size=batch_size, dtype=dtype)
    except (EvaluationError, BundleError, FileNotFoundError) as err:
        _fail(err)
    click.echo(format_metrics(result))
    if plot_path is not None:
        parity_plot(result, plot_path)
        click.echo(f"parity plot: {plot_path}")


#: console-script entry point: the allocator tunable (spkserve.allocator), then :func:`main`
entry = tuned_entry(main, light=("export", "eval"))


if __name__ == "__main__":
    entry()
