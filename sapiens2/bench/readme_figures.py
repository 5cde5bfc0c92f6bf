"""The README's performance figures, generated from the commands that print them.

Each block of the README between ``<!-- figures:NAME -->`` and ``<!-- /figures:NAME -->`` is rendered
here from the same functions as the command in ``BLOCKS[NAME]``, in that command's number formats,
so that every figure in it also appears in the command's output. ``tests/test_readme_figures.py``
checks both: the README's blocks equal what this renders, and each number in a block is printed by
its command (or, for the GPU measurements, stands in the report the GPU check wrote).

    python -m sapiens2.bench.readme_figures            # print the blocks
    python -m sapiens2.bench.readme_figures --write    # rewrite them in README.md
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

GPU_REPORT = "docs/measured/gpu_check_h200_run2"



def _block_cost() -> str:
    from .cost import compare
    from .cost_cli import ROWS, _fmt, cost_pairs

    pairs = cost_pairs("sapiens2_0.4b", (1024, 768))
    cols = []
    for ours, off in pairs:
        a, b, r = ours.summary(), off.summary(), compare(ours, off)
        cols.append((a, b, r))
    u = cols[0][0]["unit_bytes"]
    lines = ["| per 0.4B block | ours, MHA | official, MHA | ratio | ours, GQA | official, GQA | ratio | target |",
             "|---|---|---|---|---|---|---|---|"]
    targets = {"bytes": "≤ 0.55", "kernels": "≤ 0.50", "saved_bytes": "≤ 0.62", "roofline_s": "≤ 0.70"}
    for key, name in ROWS:
        cells = []
        for a, b, r in cols:
            cells += [_fmt(key, a[key], u), _fmt(key, b[key], u), f"**{r[key]:.3f}**" if key in targets else f"{r[key]:.3f}"]
        lines.append(f"| {name.strip()} | " + " | ".join(cells) + f" | {targets.get(key, '')} |")
    lines.append("")
    lines.append(f"u = one N x C bf16 activation ({u / 1e6:.2f} MB).")
    return "\n".join(lines)


def _tokenizer_cost() -> str:
    from .cost import compare, forward_stage_share, tokenizer_costs
    from .cost_cli import ROWS, _fmt

    img = (4096, 3072)
    ours, off = tokenizer_costs("sapiens2_1b", img, 1), tokenizer_costs("sapiens2_1b", img, 1, official=True)
    a, b, r = ours.summary(), off.summary(), compare(ours, off)
    u = a["unit_bytes"]
    targets = {"kernels": "≤ 0.35"}
    lines = ["| 1B-4K tokenizer, per image | ours | official | ratio | target |", "|---|---|---|---|---|"]
    for key, name in ROWS:
        lines.append(f"| {name.strip()} | {_fmt(key, a[key], u)} | {_fmt(key, b[key], u)} | {r[key]:.3f} | "
                     f"{targets.get(key, '')} |")
    m = tokenizer_costs("sapiens2_1b", img, 1, mask_ratio=0.75).summary()
    sh = forward_stage_share("sapiens2_1b", img, 1)
    lines += ["", f"At 75% MAE masking only the visible windows are computed: FLOPs {m['flops'] / a['flops']:.3f} and "
                  f"bytes {m['bytes'] / a['bytes']:.3f} of the unmasked figures ({m['bytes'] / 1e9:.1f} GB, "
                  f"{m['roofline_s'] * 1e3:.2f} ms). In an inference forward the tokenizer takes "
                  f"{sh['tokenizer_roofline_s'] * 1e3:.2f} ms of the model's {sh['forward_roofline_s'] * 1e3:.2f} ms "
                  f"({sh['tokenizer_share']:.1%}, roofline)."]
    return "\n".join(lines)


def _attention() -> str:
    from .attention_cli import COLUMNS, LAYOUT_COLUMNS, attention_rows, layout_rows, markdown

    return (markdown(COLUMNS, attention_rows(8, 3081)) + "\n\nThe 5B's attention layer, forward + backward, batch 8, "
            "with the q/k/v projection writing 76-wide or zero-padded 80-wide head rows:\n\n"
            + markdown(LAYOUT_COLUMNS, layout_rows(8, 3081)))


def _gpu_rows(root: Path) -> list[dict]:
    return json.loads((root / f"{GPU_REPORT}.json").read_text())["rows"]


def _gpu_check(root: Path | None = None) -> str:
    """Attention at B 8 x H 16 x N 3081 on the H200, from the committed GPU-check report: ours vs
    SDPA's flash and cuDNN kernels and compiled FlexAttention, in ms (the report's figures)."""
    root = root or _repo_root()
    rows = _gpu_rows(root)

    def ms(shape, impl, phase):
        for r in rows:
            if r["group"] == "attention" and r["shape"] == shape and r["impl"] == impl and r["phase"] == phase:
                return f"{r['ms']:.3f}" if r.get("ms") is not None else "n/a"
        return "n/a"

    lines = ["| D | phase | ours | ours, deterministic | SDPA flash | SDPA cuDNN | FlexAttention (compiled) |",
             "|---|---|---|---|---|---|---|"]
    for D in (64, 80, 76):
        shape = f"B8 H16/16 N3081 D={D}"
        for phase in ("fwd", "fwd+bwd"):
            det = ms(shape, "ours, deterministic bwd", phase) if phase == "fwd+bwd" else "—"
            lines.append(f"| {D} | {phase} | {ms(shape, 'ours (triton)', phase)} | {det} | {ms(shape, 'sdpa flash', phase)} | "
                         f"{ms(shape, 'sdpa cudnn', phase)} | {ms(shape, 'flex (compiled)', phase)} |")
    return "\n".join(lines)


def _pretrain_cost() -> str:
    from .pretrain_cost import describe, format_table, pretrain_config, pretrain_costs

    cfg = pretrain_config("sapiens2_1b", (1024, 768))
    ours, base = pretrain_costs("sapiens2_1b", (1024, 768), 1, cfg=cfg)
    return "```\n" + describe(cfg, 1) + "\n" + format_table(ours, base) + "\n```"


def _pretrain_dry_run() -> str:
    from ..pretrain.config import get_preset
    from ..pretrain.dry_run import dry_run, format_plan

    cfg = get_preset("5b")
    text = format_plan(cfg, [dry_run(cfg, g) for g in (8, 64, 512)])
    # the measuring time varies from run to run: not a figure of the plan
    return "```\n" + re.sub(r"\(bf16, \d+\.\d+ s\)", "(bf16)", text) + "\n```"


PROBE_REPORT = "docs/measured/pretrain_probe"


def _pretrain_probe(root: Path | None = None) -> str:
    """The learning check, from the committed probe results (``{PROBE_REPORT}_{recipe}.json``; the
    command's printed reports are in ``{PROBE_REPORT}.txt``)."""
    from .pretrain_probe import PROBE_LABELS

    root = root or _repo_root()
    r = {k: json.loads((root / f"{PROBE_REPORT}_{k}.json").read_text()) for k in ("preset", "no-koleo")}
    p, q = r["preset"], r["no-koleo"]
    lines = ["| k-NN on the teacher's [CLS], held out | tiny preset: init | trained | without KoLeo: init | "
             "trained | raw pixels |", "|---|---:|---:|---:|---:|---:|"]
    for key, label in PROBE_LABELS.items():
        lines.append(f"| {label.strip()} | {p['accuracy']['init'][key]:.1%} | {p['accuracy']['trained'][key]:.1%} | "
                     f"{q['accuracy']['init'][key]:.1%} | {q['accuracy']['trained'][key]:.1%} | "
                     f"{p['accuracy']['pixels'][key]:.1%} |")
    for name, x in (("tiny preset", p), ("without KoLeo", q)):
        t = x["pretrain"]
        lines.append("")
        lines.append(f"{name}: {t['steps']} steps x {t['global_batch']} images; loss_mae "
                     f"{t['loss_mae']['first']:.4f} -> {t['loss_mae']['last']:.4f}, loss_cl "
                     f"{t['loss_cl']['first']:.4f} -> {t['loss_cl']['last']:.4f} (log K = "
                     f"{t['log_num_prototypes']:.4f}); learned (trained > init): {x['learned']}.")
    return "\n".join(lines)


# name -> (the command printing the figures, as a user types it; its argv for sapiens2.cli.main or
# a file of the repository holding them; the block's renderer)
BLOCKS = {
    "block-cost": ("sapiens2 bench cost --arch sapiens2_0.4b", ["bench", "cost", "--arch", "sapiens2_0.4b"],
                   _block_cost),
    "tokenizer-cost": ("sapiens2 bench cost --stage tokenizer --arch sapiens2_1b --mask-ratio 0.75",
                       ["bench", "cost", "--stage", "tokenizer", "--arch", "sapiens2_1b", "--mask-ratio", "0.75"],
                       _tokenizer_cost),
    "attention": ("sapiens2 bench attention", ["bench", "attention"], _attention),
    "gpu-check": ("make gpu-check", f"{GPU_REPORT}.md", _gpu_check),
    "pretrain-cost": ("sapiens2 bench cost --stage pretrain --arch sapiens2_1b",
                      ["bench", "cost", "--stage", "pretrain", "--arch", "sapiens2_1b"], _pretrain_cost),
    "pretrain-probe": ("python -m sapiens2.bench.pretrain_probe --out DIR [--recipe no-koleo]",
                       f"{PROBE_REPORT}.txt", _pretrain_probe),
    "pretrain-dry-run": ("sapiens2 pretrain --preset 5b --dry-run --gpus 8 64 512",
                         ["pretrain", "--preset", "5b", "--dry-run", "--gpus", "8", "64", "512"], _pretrain_dry_run),
}


def _repo_root() -> Path:
    return Path(__file__).resolve().parents[2]


def render(name: str) -> str:
    return BLOCKS[name][2]()


def blocks_in(text: str) -> dict[str, str]:
    """name -> the README's text between its markers (without them)."""
    out = {}
    for m in re.finditer(r"<!-- figures:([\w-]+) -->\n(.*?)\n<!-- /figures:\1 -->", text, re.S):
        out[m.group(1)] = m.group(2)
    return out


def write(readme: Path) -> None:
    text = readme.read_text()
    for name in BLOCKS:
        new = render(name)
        text, n = re.subn(rf"(<!-- figures:{name} -->\n)(?:.*?\n)?(<!-- /figures:{name} -->)",
                          lambda m: m.group(1) + new + "\n" + m.group(2), text, flags=re.S)
        if n != 1:
            raise ValueError(f"README has {n} blocks named {name!r}, expected 1")
    readme.write_text(text)


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if "--write" in argv:
        write(_repo_root() / "README.md")
        return 0
    for name in BLOCKS:
        print(f"<!-- figures:{name} -->\n{render(name)}\n<!-- /figures:{name} -->\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
