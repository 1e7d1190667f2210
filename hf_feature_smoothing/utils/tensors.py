"""Checks on loaded tensors and the files they come from, and the digest that names a set of tensors."""

import contextlib
import hashlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open


def tensors_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 (16 hex digits) of named tensors: every name, size, dtype and value byte, in name order (the format
    of the booster digests certificates have carried since 0.2.0). Names a booster's weights or prototypes exactly."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().to("cpu").reshape(-1).contiguous()
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming the first floating-point tensor of `tensors` with NaN or inf values (`source`: where they were
    loaded from, for the message)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            raise ValueError(
                f"Tensor `{name}` loaded from {source} has NaN or inf values: the checkpoint is corrupt (or was saved "
                "after training diverged). Re-save it from a healthy model."
            )


def _unreadable(folder: Path) -> list[str]:
    """The `*.safetensors` files of `folder` whose header safetensors cannot parse."""
    bad = []
    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except (SafetensorError, OSError):
            bad.append(str(file))
    return bad


@contextlib.contextmanager
def reading_safetensors(source: str | os.PathLike, fix: str) -> Iterator[None]:
    """
    Inside the block, a safetensors file that cannot be parsed (truncated, or not a safetensors file at all) raises a
    `ValueError` naming the file (`source`: the file, or a local folder whose unreadable `*.safetensors` files are
    named), the parser's reason, and `fix`, instead of safetensors' `SafetensorError`, which names no file.
    """
    try:
        yield
    except SafetensorError as error:
        path = Path(source)
        files = _unreadable(path) if path.is_dir() else []
        named = ", ".join(f"`{f}`" for f in files) or f"`{source}`"
        raise ValueError(f"Cannot read {named}: the safetensors file is corrupt or truncated ({error}). {fix}") from error


__all__ = ["check_finite", "reading_safetensors"]
