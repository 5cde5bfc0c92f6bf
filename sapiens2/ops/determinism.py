"""The deterministic switch of the ops whose fast backward uses atomics (attention's dQ).

``deterministic=None`` on an op means: this module's setting, which by default follows
``torch.use_deterministic_algorithms``. A plain module global (not a context variable) so that
``torch.compile`` reads it as a constant and guards on it instead of breaking the graph.
"""

from __future__ import annotations

import contextlib
from typing import Iterator, Optional

import torch

_setting: Optional[bool] = None


def set_deterministic(flag: Optional[bool]) -> None:
    """``True``/``False`` forces every op's choice; ``None`` follows ``torch.are_deterministic_algorithms_enabled()``."""
    global _setting
    if flag is not None and not isinstance(flag, bool):
        raise TypeError(f"set_deterministic takes True, False or None, got {flag!r}")
    _setting = flag


def deterministic_enabled() -> bool:
    return torch.are_deterministic_algorithms_enabled() if _setting is None else _setting


@contextlib.contextmanager
def deterministic(flag: bool = True) -> Iterator[None]:
    """Run the block with the deterministic setting forced to ``flag``."""
    global _setting
    old = _setting
    set_deterministic(flag)
    try:
        yield
    finally:
        _setting = old


def resolve(flag: Optional[bool]) -> bool:
    """An op's ``deterministic`` argument: an explicit bool wins, ``None`` takes the setting."""
    if flag is None:
        return deterministic_enabled()
    if not isinstance(flag, bool):
        raise TypeError(f"deterministic must be True, False or None, got {flag!r}")
    return flag
