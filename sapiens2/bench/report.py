"""Report writing: every section goes to ``<out>/<name>.json`` and one Markdown file, plots as PNG."""

from __future__ import annotations

import json
import os
from typing import Sequence


def md_table(rows: Sequence[dict], columns: Sequence[str] | None = None, fmt: dict | None = None) -> str:
    if not rows:
        return "_(no rows)_\n"
    columns = list(columns or rows[0].keys())
    fmt = fmt or {}

    def cell(c, v):
        if c in fmt and v is not None:
            return fmt[c](v)
        if isinstance(v, float):
            return f"{v:.4g}"
        if isinstance(v, int) and not isinstance(v, bool):
            return f"{v:,}"
        return str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(c, r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


class Report:
    def __init__(self, out_dir: str, title: str):
        self.out = out_dir
        os.makedirs(out_dir, exist_ok=True)
        self.parts = [f"# {title}\n"]
        self.files: list[str] = []

    def section(self, name: str, heading: str, rows: list[dict], text: str = "", columns=None, fmt=None) -> None:
        path = os.path.join(self.out, f"{name}.json")
        with open(path, "w") as f:
            json.dump(rows, f, indent=1, default=str)
        self.files.append(path)
        self.parts.append(f"\n## {heading}\n\n{text}\n\n{md_table(rows, columns, fmt)}" if text else
                          f"\n## {heading}\n\n{md_table(rows, columns, fmt)}")

    def plot(self, name: str, caption: str) -> str:
        path = os.path.join(self.out, f"{name}.png")
        self.files.append(path)
        self.parts.append(f"\n![{caption}]({name}.png)\n")
        return path

    def note(self, text: str) -> None:
        self.parts.append("\n" + text + "\n")

    def write(self) -> str:
        path = os.path.join(self.out, "report.md")
        with open(path, "w") as f:
            f.write("".join(self.parts))
        self.files.append(path)
        return path
