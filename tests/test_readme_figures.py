"""The README's performance figures against the commands that print them: every generated block
(``sapiens2.bench.readme_figures``) is current, names its command in the README, and each of its
figures appears in that command's output (or, for the GPU measurements, in the report the GPU
check wrote)."""

import re
from pathlib import Path

import pytest

from sapiens2 import cli
from sapiens2.bench import readme_figures as rf

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = rf.blocks_in(README)


def test_readme_has_every_generated_block():
    assert set(BLOCKS) == set(rf.BLOCKS)


@pytest.mark.parametrize("name", list(rf.BLOCKS))
def test_readme_block_is_current(name):
    assert BLOCKS[name] == rf.render(name), f"stale: run python -m sapiens2.bench.readme_figures --write"


@pytest.mark.parametrize("name", list(rf.BLOCKS))
def test_every_figure_is_printed_by_the_named_command(name, capsys):
    command, source, _ = rf.BLOCKS[name]
    assert f"`{command}`" in README, f"the README must name the command printing the {name} figures"
    if isinstance(source, list):
        assert cli.main(source) == 0
        printed = capsys.readouterr().out
    else:
        printed = (ROOT / source).read_text()
    # measured or counted values (integers are labels; "≤ x" cells are the targets)
    figures = re.findall(r"\d+\.\d+", re.sub(r"≤ \d+\.\d+", "", BLOCKS[name]))
    assert len(figures) > 10
    missing = sorted({f for f in figures if f not in printed})
    assert not missing, f"{name}: figures not printed by `{command}`: {missing}"
