"""MFU arithmetic, device-peak detection, timing and scaling tables of the benchmark harness."""

import pytest

from sapiens2.bench.device import H100_SXM, PEAKS, detect, mfu, roofline_seconds
from sapiens2.bench.scaling import scaling_rows
from sapiens2.bench.timing import time_fn


@pytest.mark.parametrize(
    "name,sms,key",
    [
        ("NVIDIA H100 80GB HBM3", 132, "h100-sxm"),
        ("NVIDIA H100 PCIe", 114, "h100-pcie"),
        ("NVIDIA H100 NVL", 132, "h100-nvl"),
        ("NVIDIA H200", 132, "h200"),
        ("NVIDIA A100-SXM4-80GB", 108, "a100-sxm"),
    ],
)
def test_detect(name, sms, key):
    assert detect(name, sms) is PEAKS[key]


def test_detect_unknown():
    assert detect("NVIDIA GeForce RTX 4090", 128) is None


def test_mfu_arithmetic():
    # 989.4 TFLOP in one second on one H100 SXM is 100%; on 8 GPUs, 12.5%
    assert mfu(989.4e12, 1.0, H100_SXM) == pytest.approx(1.0)
    assert mfu(989.4e12, 1.0, H100_SXM, num_devices=8) == pytest.approx(0.125)
    assert mfu(400e12, 2.0, H100_SXM) == pytest.approx(200 / 989.4)
    with pytest.raises(ValueError):
        mfu(1.0, 0.0, H100_SXM)


def test_roofline():
    assert roofline_seconds(989.4e12, 0) == pytest.approx(1.0)
    assert roofline_seconds(0, 3.35e12) == pytest.approx(1.0)
    assert roofline_seconds(1e12, 1e12) == pytest.approx(1e12 / 3.35e12)


def test_cpu_timing_reports_cpu():
    t = time_fn(lambda: sum(range(1000)), warmup=1, repeats=5, cuda=False)
    assert t.device == "cpu" and t.repeats == 5 and 0 < t.p20_s <= t.median_s <= t.p80_s


def test_scaling_rows_grow_with_resolution():
    rows = scaling_rows(archs=["sapiens2_0.4b"])
    flat = {(r["resolution"], r["use_tokenizer"]): r["flops_train_step"] for r in rows}
    assert flat[("1K", False)] < flat[("2K", False)] < flat[("4K", False)]
    assert flat[("4K", True)] < flat[("4K", False)]  # the tokenizer condenses 16 tokens into one
