"""Optional dependencies: import them by the extra that installs them, with an error that says so.

``require("tqdm", "bench")`` returns the module, or raises ``MissingExtra`` ("... pip install
'sapiens2[bench]'"); the command line prints that message instead of a traceback."""

from __future__ import annotations

import importlib


class MissingExtra(ImportError):
    """An optional dependency of a feature is not installed."""


def require(module: str, extra: str, feature: str = "this command"):
    try:
        return importlib.import_module(module)
    except ImportError as e:
        top = module.split(".")[0]
        raise MissingExtra(f"{feature} needs the optional package {top!r} ({e.__class__.__name__}: {e}); install "
                           f"it with: pip install 'sapiens2[{extra}]'") from e
