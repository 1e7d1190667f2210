"""What the hardware does fast (bf16 only where it is native: on AVX2-only CPUs bf16 autocast is ~7× slower) and what
it is (recorded beside the seconds of run rows)."""

import functools
import platform
from pathlib import Path

import torch


@functools.cache
def _cpuinfo(field: str) -> str:
    """The first `field : value` of /proc/cpuinfo ("" where there is none, or no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return ""
    line = next((line for line in text.splitlines() if line.partition(":")[0].strip() == field), "")
    return line.partition(":")[2].strip()


def _cpu_flags() -> frozenset[str]:
    return frozenset(_cpuinfo("flags").split())


def bf16_supported(device: str | torch.device = "cpu") -> bool:
    """True where bf16 math is native: CUDA devices that report it, CPUs with AVX512-BF16 or AMX-BF16."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    if device.type == "cpu":
        return bool({"avx512_bf16", "amx_bf16"} & _cpu_flags())
    return False


def describe(device: str | torch.device = "cpu") -> dict:
    """Where timings are measured (recorded in run headers beside their seconds): the CPU model, the vector
    instructions torch's CPU kernels use (`cpu_capability`, e.g. "AVX2" or "AVX512": one model name covers both, and
    the passes' speed differs several times between them), whether bf16 is native there, torch's CPU threads and,
    when `device` is an accelerator, its name."""
    device = torch.device(device)
    described = {"cpu": _cpuinfo("model name") or platform.processor() or platform.machine(),
                 "cpu_capability": torch.backends.cpu.get_cpu_capability(), "cpu_bf16": bf16_supported("cpu"),
                 "threads": torch.get_num_threads(), "device": device.type}
    if device.type == "cuda" and torch.cuda.is_available():
        described["device"] = torch.cuda.get_device_name(device)
    return described
