"""Optional dependencies by job: plotting (``plot``), POT's exact OT (``ot``), image files
(``images``), scikit-learn's digits (``digits``); ``all`` installs every one of them.

A command that needs a missing one stops with one line naming the extra to install.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtra(ImportError):
    """An optional dependency is not installed; the message names ``pip install flowmatch[X]``."""


def require(module: str, extra: str) -> ModuleType:
    """``module`` imported, or ``MissingExtra`` naming the package and the extra to install."""
    try:
        return importlib.import_module(module)
    except ImportError as error:
        missing = error.name or module
        raise MissingExtra(
            f"this needs {missing.split('.')[0]}, which is not installed: "
            f'pip install "flowmatch[{extra}]"'
        ) from error
