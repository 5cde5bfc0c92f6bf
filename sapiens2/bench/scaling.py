"""How cost grows with resolution (1K -> 2K -> 4K, with and without the tokenizer) and model size."""

from __future__ import annotations

from ..flops import count_flops
from ..models.config import ARCH_ZOO
from .device import H100_SXM

RESOLUTIONS = {"1K": (1024, 768), "2K": (2048, 1536), "4K": (4096, 3072)}


def scaling_rows(archs=None, resolutions=RESOLUTIONS) -> list[dict]:
    rows = []
    for arch in archs or ARCH_ZOO:
        for label, img in resolutions.items():
            for tok in (False, True):
                r = count_flops(arch, img, use_tokenizer=tok)
                rows.append({
                    "arch": arch, "resolution": label, "img_size": list(img), "use_tokenizer": tok,
                    "params": r.params, "trunk_tokens": r.trunk_tokens,
                    "flops_forward": r.flops_forward, "flops_train_step": r.flops_train_step,
                    "attention_share": r.flops_attention / r.flops_forward,
                    "h100_train_step_s_at_peak": r.flops_train_step / H100_SXM.bf16_flops,
                })
    return rows


def plot_scaling(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    for i, arch in enumerate(dict.fromkeys(r["arch"] for r in rows)):
        for tok, style in ((False, "-o"), (True, "--s")):
            pts = [r for r in rows if r["arch"] == arch and r["use_tokenizer"] == tok]
            xs = [r["img_size"][0] * r["img_size"][1] for r in pts]
            a.loglog(xs, [r["flops_train_step"] for r in pts], style, color=f"C{i}",
                     label=f"{arch}{' + tokenizer' if tok else ''}")
    a.set_xlabel("pixels per image")
    a.set_ylabel("FLOPs per training step (1 image)")
    a.set_title("Cost vs resolution")
    a.legend(fontsize=6, ncol=2)
    for label in dict.fromkeys(r["resolution"] for r in rows):
        pts = [r for r in rows if r["resolution"] == label and not r["use_tokenizer"]]
        b.loglog([r["params"] for r in pts], [r["flops_train_step"] for r in pts], "-o", label=f"{label}, no tokenizer")
    b.set_xlabel("parameters")
    b.set_title("Cost vs model size")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
