"""Fake (meta) implementations of the extension's ops, registered per namespace, so that
``torch.compile`` and FakeTensor tracing see the output shapes without running a kernel. Each
family module defines ``register_fakes(ns)``; families whose module is absent are skipped."""

from __future__ import annotations

import importlib

_done: set[str] = set()


def register(ns: str) -> None:
    if ns in _done:
        return
    from . import FAMILIES

    for fam in FAMILIES:
        try:
            mod = importlib.import_module(f"sapiens2.ops.cuda.{fam}")
        except ModuleNotFoundError:
            continue
        mod.register_fakes(ns)
    _done.add(ns)
