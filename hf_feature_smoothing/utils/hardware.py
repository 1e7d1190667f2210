"""What the hardware does fast: bf16 only where it is native (on AVX2-only CPUs bf16 autocast is ~7× slower)."""

import functools
from pathlib import Path

import torch


@functools.cache
def _cpu_flags() -> frozenset[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    return frozenset(line.partition(":")[2].split())


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """True where bf16 math is native: CUDA devices that report it, CPUs with AVX512-BF16 or AMX-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False
