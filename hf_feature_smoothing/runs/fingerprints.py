"""Identities of what a run depends on beyond its options: the model's weights, its smoothing settings and the
prototype file."""

import hashlib
import json
import os

import torch
from torch import nn


def weights_fingerprint(model: nn.Module, values_per_tensor: int = 64) -> str:
    """
    16 hex digits from every tensor of `model.state_dict()` (booster adapters included): its name, shape, dtype and
    `values_per_tensor` evenly spaced values. Two different checkpoints (a fine-tune, another seed, a booster)
    practically always differ; computing it costs a few values per tensor, whatever the model size.
    """
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        flat = tensor.detach().reshape(-1)
        step = max(1, flat.numel() // values_per_tensor)
        sample = flat[::step][:values_per_tensor].to("cpu", torch.float64)
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}|".encode())
        digest.update(sample.numpy().tobytes())
    return digest.hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (read in blocks)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def values_digest(values) -> str:
    """16 hex digits of a JSON-serialisable value (e.g. a feature centre of thousands of floats) for a run header."""
    return hashlib.sha256(json.dumps(values).encode()).hexdigest()[:16]
