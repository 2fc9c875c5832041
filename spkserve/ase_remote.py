"""ASE calculator that asks a running ``spkserve serve`` for energies and forces.

    from spkserve.ase_remote import RemoteCalculator
    atoms.calc = RemoteCalculator(unix="/tmp/spk.sock")   # or host="127.0.0.1", port=N, token=...

Results in eV, eV/Å and eV/Å³ (stress for fully periodic systems), exactly
what the local :class:`spkserve.ase.BundleCalculator` gives for the same bundle.
"""

from __future__ import annotations

from typing import Any, Sequence

from spkserve.ase import ProviderCalculator
from spkserve.server.client import RemoteProvider


class RemoteCalculator(ProviderCalculator):
    """ASE calculator over a model server (see :class:`spkserve.server.client.Client` for arguments).

    Args:
        unix / host, port, token: the server's address (as for :class:`Client`).
        extra_properties: further model outputs to fetch, e.g. ``["dipole_moment"]``.
        timeout_s: how long to wait for one reply.
    """

    def __init__(
        self,
        unix: str | None = None,
        host: str | None = None,
        port: int | None = None,
        token: str | None = None,
        *,
        extra_properties: Sequence[str] = (),
        timeout_s: float = 60.0,
        **kwargs: Any,
    ) -> None:
        provider = RemoteProvider(unix=unix, host=host, port=port, token=token, timeout_s=timeout_s)
        super().__init__(provider, extra_properties=extra_properties, **kwargs)

    @property
    def server_metadata(self) -> dict:
        """What the server reported: species, cutoff (Å), properties, limits."""
        return self.provider.metadata

    def close(self) -> None:
        self.provider.close()

    def __enter__(self) -> "RemoteCalculator":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
