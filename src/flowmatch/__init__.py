"""flowmatch: flow matching and flow-map generative models in PyTorch.

``flowmatch.load_run(RUN_DIR)`` returns a trained run (EMA weights, path, config); the parts
live in ``flowmatch.paths``, ``couplings``, ``losses``, ``solvers``, ``oracles``, ``nets``,
``data``, ``metrics`` and ``training``.
"""

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Loaded on first use, so that `import flowmatch` stays light.
    if name in ("load_run", "export_run"):
        from flowmatch.app import runs

        return getattr(runs, name)
    raise AttributeError(f"module 'flowmatch' has no attribute {name!r}")
