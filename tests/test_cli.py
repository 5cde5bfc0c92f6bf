"""The command line, run as users run it."""

import json
import subprocess
import sys

import pytest

from sapiens2.cli import main


def test_flops_all_json(capsys):
    assert main(["flops", "--all", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 6
    for key in ("arch", "use_tokenizer", "img_size", "params", "macs_linear_conv", "flops_attention",
                "flops_forward", "flops_train_step"):
        assert all(key in r for r in rows)
    assert {r["arch"] for r in rows} == {"sapiens2_0.1b", "sapiens2_0.4b", "sapiens2_0.8b", "sapiens2_1b", "sapiens2_5b"}


def test_flops_all_table_says_published_is_not_reproducible(capsys):
    assert main(["flops", "--all"]) == 0
    out = capsys.readouterr().out
    assert "cannot be reproduced" in out and "Sapiens2-1B (4K)" in out


def test_flops_single_and_bad_arch(capsys):
    assert main(["flops", "--arch", "sapiens2_0.4b", "--mask-ratio", "0.75", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)[0]["trunk_tokens"] == 9 + 768
    assert main(["flops", "--arch", "nope"]) == 2
    assert "unknown arch" in capsys.readouterr().err


def test_info_and_help():
    out = subprocess.run([sys.executable, "-m", "sapiens2.cli", "info", "--json"], capture_output=True, text=True,
                         check=True).stdout
    info = json.loads(out)
    assert info["torch"] and "reference" in info["backends"]
    helptext = subprocess.run([sys.executable, "-m", "sapiens2.cli", "--help"], capture_output=True, text=True).stdout
    for cmd in ("flops", "info", "kernels", "bench"):
        assert cmd in helptext


def test_unknown_command_fails():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_bench_quick_writes_report(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["bench", "--quick", "--out", str(out)]) == 0
    for name in ("report.md", "flops.json", "scaling.json", "scaling.png", "cost_blocks.json", "cost_blocks.png",
                 "cost_tokenizer.json", "compile_sm90a.json", "attention_roofline.json"):
        assert (out / name).exists() and (out / name).stat().st_size > 0, name
    text = (out / "report.md").read_text()
    assert "Scaling" in text and "Cost model" in text and "sm_90a" in text


def test_missing_extra_names_the_extra(monkeypatch, capsys):
    """`sapiens2 bench` without its optional packages says which extra installs them, no traceback."""
    import sys

    from sapiens2.cli import main

    monkeypatch.setitem(sys.modules, "tqdm", None)  # makes `import tqdm` fail as if not installed
    assert main(["bench", "--quick", "--only", "flops", "--out", "/tmp/sapiens2-no-extra"]) == 2
    err = capsys.readouterr().err
    assert "pip install 'sapiens2[bench]'" in err and "tqdm" in err and "Traceback" not in err
