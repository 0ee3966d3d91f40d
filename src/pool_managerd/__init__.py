"""pool-managerd: a per-host daemon that owns GPU inference engines, driven over NATS.

The seed's flat API holds: ``from pool_managerd import health, registry, preload, drain,
supervision, devicemasks, hetero_split, preflight``. The modules are loaded on first use so
that importing the package (the fake engine does) stays cheap.
"""

from __future__ import annotations

import importlib
from types import ModuleType
from typing import TYPE_CHECKING

__version__ = "0.1.0"

_MODULES = {
    "health": "pool_managerd.core.health",
    "registry": "pool_managerd.core.registry",
    "machine": "pool_managerd.core.machine",
    "preload": "pool_managerd.lifecycle.preload",
    "drain": "pool_managerd.lifecycle.drain",
    "supervision": "pool_managerd.lifecycle.supervision",
    "devicemasks": "pool_managerd.placement.devicemasks",
    "hetero_split": "pool_managerd.placement.hetero_split",
    "preflight": "pool_managerd.validation.preflight",
}

__all__ = [
    "__version__",
    "devicemasks",
    "drain",
    "health",
    "hetero_split",
    "machine",
    "preflight",
    "preload",
    "registry",
    "supervision",
]

if TYPE_CHECKING:
    from pool_managerd.core import health, machine, registry
    from pool_managerd.lifecycle import drain, preload, supervision
    from pool_managerd.placement import devicemasks, hetero_split
    from pool_managerd.validation import preflight


def __getattr__(name: str) -> ModuleType:
    target = _MODULES.get(name)
    if target is None:
        raise AttributeError(f"module 'pool_managerd' has no attribute {name!r}")
    module = importlib.import_module(target)
    globals()[name] = module
    return module
