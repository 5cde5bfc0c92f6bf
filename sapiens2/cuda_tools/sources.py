"""Where the CUDA kernel sources are: the checkout's ``csrc/`` (editable installs, the tests) or
the copy shipped inside the package as ``sapiens2/_csrc`` (wheels), and a hash of them for caches."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

_PKG = Path(__file__).resolve().parents[1]


def csrc_dir() -> Path | None:
    """The kernel source tree, or None when neither the checkout nor the package has one."""
    for cand in (_PKG.parent / "csrc", _PKG / "_csrc"):
        if (cand / "kernels").is_dir():
            return cand
    return None


def kernel_sources(root: Path) -> list[Path]:
    """The kernel translation units (torch-free ``.cu`` files)."""
    return sorted((root / "kernels").glob("*.cu"))


def source_hash(root: Path, extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for sub in ("kernels", "emu"):
        for p in sorted((root / sub).glob("*")):
            if p.suffix in (".cu", ".cuh", ".h", ".cpp"):
                h.update(p.name.encode())
                h.update(p.read_bytes())
    return h.hexdigest()[:16]


def cache_dir() -> Path:
    d = Path(os.environ.get("SAPIENS2_CACHE", Path.home() / ".cache" / "sapiens2"))
    d.mkdir(parents=True, exist_ok=True)
    return d
