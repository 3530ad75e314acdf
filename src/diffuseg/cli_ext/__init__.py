"""Per-method CLI extensions.

Each module here defines ``register(app, train_app) -> None`` and adds its method's commands
(``diffuseg train <method>``, extra commands such as ``diffuseg augment``). Modules must import
only light dependencies at import time (torch and friends inside the command functions) so
that ``diffuseg --help`` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil

__all__ = ["register_all"]


def register_all(app, train_app) -> None:
    """Import every extension module in this package and let it add its commands."""
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        module.register(app, train_app)
