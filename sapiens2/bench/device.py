"""Peak figures of the accelerators we size for, detection by name and SM count, and MFU.

MFU (model FLOPs utilisation) = model FLOPs per second / peak dense bf16 FLOP/s, where model
FLOPs count the training step once (no recomputation); hardware FLOPs (with activation
recomputation) are reported beside it as HFU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


@dataclass(frozen=True)
class DevicePeak:
    name: str
    bf16_flops: float  # dense bf16 tensor-core FLOP/s
    hbm_bytes_per_s: float
    sms: int
    smem_per_block: int  # bytes of shared memory one block may use


H100_SXM = DevicePeak("NVIDIA H100 SXM", 989.4e12, 3.35e12, 132, 227 * 1024)
PEAKS = {
    "h100-sxm": H100_SXM,
    "h100-pcie": DevicePeak("NVIDIA H100 PCIe", 756.0e12, 2.0e12, 114, 227 * 1024),
    "h100-nvl": DevicePeak("NVIDIA H100 NVL", 835.0e12, 3.9e12, 132, 227 * 1024),
    "h200": DevicePeak("NVIDIA H200", 989.4e12, 4.8e12, 132, 227 * 1024),
    "a100-sxm": DevicePeak("NVIDIA A100 SXM", 312.0e12, 2.039e12, 108, 163 * 1024),
    "a100-pcie": DevicePeak("NVIDIA A100 PCIe", 312.0e12, 1.935e12, 108, 163 * 1024),
}


def detect(name: str, sm_count: int) -> Optional[DevicePeak]:
    """Peak figures for a device from its reported name and SM count; None when unknown."""
    n = name.lower()
    if "h200" in n:
        return PEAKS["h200"]
    if "h100" in n:
        if "nvl" in n:
            return PEAKS["h100-nvl"]
        if "pcie" in n or sm_count == 114:
            return PEAKS["h100-pcie"]
        return PEAKS["h100-sxm"]
    if "a100" in n:
        return PEAKS["a100-pcie"] if "pcie" in n else PEAKS["a100-sxm"]
    return None


def current_device_peak() -> Optional[DevicePeak]:
    import torch

    if not torch.cuda.is_available():
        return None
    props = torch.cuda.get_device_properties(0)
    return detect(props.name, props.multi_processor_count)


def mfu(model_flops: float, seconds: float, peak: DevicePeak, num_devices: int = 1) -> float:
    """Fraction of the devices' dense bf16 peak that ``model_flops`` done in ``seconds`` represent."""
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    return model_flops / seconds / (peak.bf16_flops * num_devices)


def roofline_seconds(flops: float, bytes_moved: float, peak: DevicePeak = H100_SXM) -> float:
    """Lower bound on a kernel's time: bound by compute or by memory traffic."""
    return max(flops / peak.bf16_flops, bytes_moved / peak.hbm_bytes_per_s)
