"""The optional packages of the ``video`` extra (PyAV, supervision, trackers): importing one that is
missing is a one-line ConfigError naming the pip command."""
from __future__ import annotations

import importlib
from types import ModuleType

from ..errors import ConfigError

INSTALL_HINT = "pip install 'dinodet[video]'"


def require(module: str, feature: str = "video input") -> ModuleType:
    """``import module``, or a one-line ConfigError that names the pip command for the extra."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise ConfigError(f"{feature} needs the '{module}' package: {INSTALL_HINT}") from None
