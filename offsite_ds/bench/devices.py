"""Which device the benchmark ran on, and the peak FLOP/s its MFU is measured against.

Peaks are the vendors' datasheet figures for dense BF16 tensor-core math (without 2:4 sparsity), since the
training loop runs matmuls in bf16 autocast on CUDA. On CPU no MFU is reported.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

# (substring of torch.cuda.get_device_name(), TFLOP/s dense bf16, source); first match wins, so the more
# specific names come first.
PEAK_BF16_TFLOPS: tuple[tuple[str, float, str], ...] = (
    ("H100 PCIe", 756.0, "NVIDIA H100 datasheet, PCIe, BF16 Tensor Core dense (1,513 with sparsity)"),
    ("H100 NVL", 835.0, "NVIDIA H100 datasheet, NVL, BF16 Tensor Core dense (1,671 with sparsity)"),
    ("H100", 989.0, "NVIDIA H100 datasheet, SXM, BF16 Tensor Core dense (1,979 with sparsity)"),
    ("H200", 989.0, "NVIDIA H200 datasheet, SXM, BF16 Tensor Core dense (1,979 with sparsity)"),
    ("A100", 312.0, "NVIDIA A100 datasheet, BF16 Tensor Core dense (624 with sparsity)"),
    ("L40S", 362.05, "NVIDIA L40S datasheet, BF16 Tensor Core dense (733 with sparsity)"),
    ("RTX A6000", 154.8, "NVIDIA RTX A6000 datasheet, BF16 Tensor Core dense (309.7 with sparsity)"),
)


@dataclass
class DeviceInfo:
    type: str  # "cuda" or "cpu"
    name: str
    memory_gb: float | None
    peak_tflops: float | None  # dense bf16; None on CPU or for an unknown GPU
    peak_source: str

    def to_json(self) -> dict:
        return asdict(self)


def peak_for_name(name: str) -> tuple[float | None, str]:
    for key, tflops, source in PEAK_BF16_TFLOPS:
        if key.lower() in name.lower():
            return tflops, source
    return None, f"unknown GPU '{name}': pass --peak-tflops (dense bf16 from its datasheet) for MFU"


def describe_device(device: torch.device, peak_override: float | None = None) -> DeviceInfo:
    """The device's name, memory and peak; an explicit `peak_override` (TFLOP/s) wins over the table."""
    if device.type != "cuda":
        import platform

        return DeviceInfo("cpu", platform.processor() or platform.machine(), None, None,
                          "CPU: MFU is not reported")
    props = torch.cuda.get_device_properties(device)
    peak, source = peak_for_name(props.name)
    if peak_override is not None:
        peak, source = peak_override, "--peak-tflops given on the command line"
    return DeviceInfo("cuda", props.name, round(props.total_memory / 2**30, 2), peak, source)
