"""msgpack model server: wire format (:mod:`.protocol`), server (:mod:`.server`),
dynamic batching (:mod:`.batching`), client and remote provider (:mod:`.client`).

Names are imported lazily so that ``spkserve.server.client`` stays free of torch.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "ModelServer": "spkserve.server.server",
    "ServerConfig": "spkserve.server.server",
    "ServerSetupError": "spkserve.server.server",
    "Client": "spkserve.server.client",
    "RemoteProvider": "spkserve.server.client",
    "ServerError": "spkserve.server.client",
    "Limits": "spkserve.server.protocol",
    "ProtocolError": "spkserve.server.protocol",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'spkserve.server' has no attribute {name!r}")
