"""Checks on loaded tensors."""

import torch


def check_finite(tensors: dict[str, torch.Tensor], source: str) -> None:
    """Raise naming the first floating-point tensor of `tensors` with NaN or inf values (`source`: where they were
    loaded from, for the message)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and tensor.device.type != "meta" and not torch.isfinite(tensor).all():
            raise ValueError(
                f"Tensor `{name}` loaded from {source} has NaN or inf values: the checkpoint is corrupt (or was saved "
                "after training diverged). Re-save it from a healthy model."
            )


__all__ = ["check_finite"]
