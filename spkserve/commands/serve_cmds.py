"""``spkserve serve``: the msgpack model server (thin wrapper over :class:`ModelServer`)."""

from __future__ import annotations

import logging
import os
import stat
from pathlib import Path

import click


def read_token(token_file: str | None) -> str | None:
    """Token from a file (first line, stripped) or ``$SPKSERVE_TOKEN``; None if neither."""
    if token_file is not None:
        path = Path(token_file)
        mode = path.stat().st_mode
        if mode & (stat.S_IRWXG | stat.S_IRWXO):
            logging.getLogger("spkserve.server").warning(
                "token file %s is readable by other users; chmod 600 it", path
            )
        lines = path.read_text().strip().splitlines()
        token = lines[0].strip() if lines else ""
        if not token:
            raise click.BadParameter(f"token file {path} is empty", param_hint="--token-file")
        return token
    return os.environ.get("SPKSERVE_TOKEN") or None


@click.command()
@click.argument("bundle", type=click.Path(exists=True, dir_okay=False))
@click.option("--unix", "unix_path", type=click.Path(dir_okay=False), help="Listen on this unix socket path.")
@click.option("--host", help="Listen on this TCP host (loopback only unless --allow-remote).")
@click.option("--port", type=int, default=None, help="TCP port (0 picks a free one).")
@click.option("--batch-window-us", type=float, default=500.0, show_default=True,
              help="How long a request waits for others to share its model call (µs).")
@click.option("--max-batch-atoms", type=int, default=20_000, show_default=True, help="Atoms per model call.")
@click.option("--no-batching", is_flag=True, help="One request per model call.")
@click.option("--token-file", type=click.Path(exists=True, dir_okay=False),
              help="File holding the auth token (default: $SPKSERVE_TOKEN). Required for TCP.")
@click.option("--allow-remote", is_flag=True, help="Allow binding a non-loopback host (needs a token).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default=None, help="Evaluation precision.")
@click.option("--device", default="cpu", show_default=True, help="Torch device.")
@click.option("--skin", "skin_angstrom", type=float, default=1.0, show_default=True,
              help="Neighbor-list skin (Å); 0 rebuilds the list every call.")
@click.option("--torch-threads", type=int, default=1, show_default=True,
              help="Torch intra-op threads; 1 is fastest for small molecules and on busy machines.")
@click.option("--request-timeout-s", type=float, default=60.0, show_default=True)
@click.option("--max-connections", type=int, default=64, show_default=True)
@click.option("--max-message-mb", type=float, default=64.0, show_default=True, help="Largest accepted message.")
@click.option("--max-atoms", type=int, default=100_000, show_default=True, help="Largest accepted structure.")
@click.option("--log-level", type=click.Choice(["debug", "info", "warning", "error"]), default="info",
              show_default=True)
def serve(bundle: str, unix_path: str | None, host: str | None, port: int | None, batch_window_us: float,
          max_batch_atoms: int, no_batching: bool, token_file: str | None, allow_remote: bool,
          dtype: str | None, device: str, skin_angstrom: float, torch_threads: int, request_timeout_s: float, max_connections: int,
          max_message_mb: float, max_atoms: int, log_level: str) -> None:
    """Serve BUNDLE to msgpack clients (spkserve.server.client.Client, RemoteCalculator,
    spkmd) with dynamic batching. Stops cleanly on SIGTERM/SIGINT after answering
    every accepted request."""
    from spkserve.server.protocol import Limits
    from spkserve.server.server import ModelServer, ServerSetupError

    logging.basicConfig(level=getattr(logging, log_level.upper()),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if (unix_path is None) == (host is None):
        raise click.UsageError("give exactly one of --unix PATH or --host HOST --port N")
    if host is not None and port is None:
        raise click.UsageError("--host needs --port N (0 picks a free port)")
    try:
        limits = Limits(max_message_bytes=int(max_message_mb * 2**20), max_atoms_per_structure=max_atoms)
        server = ModelServer.from_bundle(
            bundle, dtype=dtype, device=device, skin_angstrom=skin_angstrom,
            unix_path=unix_path, host=host, port=port or 0, token=read_token(token_file),
            allow_remote=allow_remote, batch_window_us=batch_window_us, max_batch_atoms=max_batch_atoms,
            max_batch_requests=1 if no_batching else None, request_timeout_s=request_timeout_s,
            max_connections=max_connections, limits=limits, torch_threads=torch_threads,
        )
        server.serve_forever(handle_signals=True)
    except (ServerSetupError, ValueError, OSError) as err:
        raise click.ClickException(str(err)) from err
