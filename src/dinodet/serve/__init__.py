"""``dinodet serve``: an HTTP detection service (FastAPI + uvicorn) with a web page.

``create_app(detector, ServeOptions(...))`` builds the ASGI app around a loaded detector (any of
``Detector``, ``OnnxDetector``, ``OpenVinoDetector``); ``run_server(DetectorOptions(...), ServeOptions(...))``
loads the model and serves until SIGTERM / Ctrl-C; ``BackgroundServer`` runs an app in a thread
(tests, notebooks, benchmarks).  Needs the ``serve`` extra (``pip install 'dinodet[serve]'``); the
names here are imported lazily so that a missing extra is one clear error, not an ImportError.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError

INSTALL_HINT = "pip install 'dinodet[serve]'"
_REQUIRED = ("fastapi", "uvicorn", "python_multipart", "prometheus_client")

_EXPORTS = {
    "create_app": ".app",
    "ServeOptions": ".app",
    "run_server": ".server",
    "BackgroundServer": ".server",
    "DynamicBatcher": ".batching",
}

__all__ = ["INSTALL_HINT", "BackgroundServer", "DynamicBatcher", "ServeOptions", "create_app", "require_serve",
           "run_server"]

if TYPE_CHECKING:
    from .app import ServeOptions, create_app
    from .batching import DynamicBatcher
    from .server import BackgroundServer, run_server


def require_serve() -> None:
    """Check that the serve extra is installed: a one-line ConfigError naming the pip command if not."""
    for module in _REQUIRED:
        try:
            importlib.import_module(module)
        except ImportError:
            package = module.replace("_", "-")
            raise ConfigError(f"dinodet serve needs the '{package}' package: {INSTALL_HINT}") from None


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'dinodet.serve' has no attribute '{name}'")
    require_serve()
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
