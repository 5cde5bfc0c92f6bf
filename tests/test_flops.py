"""Analytic parameter/FLOP counts against the meta-device model and torch's FlopCounterMode."""

import json
import os

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from sapiens2 import ARCH_ZOO, ArchConfig, Sapiens2Backbone
from sapiens2.flops import count_flops, zoo_table


def _measure(cfg, img, use_tokenizer, batch=1, mask_ratio=0.0, train=False):
    model = Sapiens2Backbone(cfg, use_tokenizer=use_tokenizer, device="meta")
    x = torch.empty(batch, 3, *img, device="meta")
    ids = None
    if mask_ratio:
        rep = count_flops(cfg, img, use_tokenizer=use_tokenizer)
        n = rep.trunk_tokens - 9
        keep = n - int(round(mask_ratio * n))
        ids = torch.arange(keep, device="meta").expand(batch, keep)
    with FlopCounterMode(display=False) as fc:
        out = model(x, ids)
        if train:
            out.backward(torch.empty_like(out))
    return fc.get_total_flops(), model


@pytest.mark.parametrize("arch", sorted(ARCH_ZOO))
def test_params_match_model(arch):
    for tok in (False, True):
        model = Sapiens2Backbone(arch, use_tokenizer=tok, device="meta")
        assert count_flops(arch, use_tokenizer=tok).params == sum(p.numel() for p in model.parameters())


def test_zoo_params_equal_official_code_counts():
    card = json.load(open(os.path.join(os.path.dirname(__file__), "..", "sapiens2", "data", "model_card.json")))
    for row, card_row in zip(zoo_table(), card["rows"]):
        assert row["params"] == card_row["params_official_code"]


TINY_TOK = ArchConfig("tiny", embed_dims=64, num_layers=18, num_heads=4, num_tokenizer_layers=3)


@pytest.mark.parametrize(
    "cfg,img,tok,batch,mask,train",
    [
        ("sapiens2_0.4b", (1024, 768), False, 1, 0.0, False),
        ("sapiens2_0.4b", (1024, 768), False, 2, 0.0, True),
        ("sapiens2_5b", (512, 384), False, 1, 0.75, True),
        (TINY_TOK, (256, 192), True, 2, 0.0, True),
        (TINY_TOK, (256, 192), True, 1, 0.75, True),
        ("sapiens2_1b", (1024, 768), True, 1, 0.0, False),
    ],
)
def test_flops_match_flop_counter(cfg, img, tok, batch, mask, train):
    measured, _ = _measure(cfg, img, tok, batch, mask, train)
    rep = count_flops(cfg, img, batch=batch, use_tokenizer=tok, mask_ratio=mask)
    assert measured == (rep.hw_flops_train_step if train else rep.flops_forward)
    if not tok:
        assert rep.hw_flops_train_step == rep.flops_train_step


def test_official_schedule_matches_model_card_macs():
    # the 1B-4K row: Linear MACs of the official code, tokenizer included (model card measurement)
    rep = count_flops("sapiens2_1b", (4096, 3072), use_tokenizer=True, schedule="official")
    assert rep.macs_linear_conv == 12363258396672 + 57982058496
    ours = count_flops("sapiens2_1b", (4096, 3072), use_tokenizer=True)
    assert ours.macs_tokenizer < rep.macs_tokenizer


def test_masking_scales_cost():
    full = count_flops("sapiens2_1b", (4096, 3072), use_tokenizer=True)
    masked = count_flops("sapiens2_1b", (4096, 3072), use_tokenizer=True, mask_ratio=0.75)
    assert masked.macs_tokenizer * 4 == full.macs_tokenizer
    assert masked.trunk_tokens == 9 + 768


def test_bad_arguments():
    with pytest.raises(ValueError, match="divisible"):
        count_flops("sapiens2_0.1b", (1000, 768))
    with pytest.raises(ValueError, match="unknown arch"):
        count_flops("sapiens2_3b")
    with pytest.raises(ValueError, match="mask_ratio"):
        count_flops("sapiens2_0.1b", mask_ratio=1.0)
