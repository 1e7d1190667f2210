"""Reproducible Gaussian noise for certification: the noise of an image depends only on (seed, image, stream,
sample index), never on the image's position in a batch, on the chunking, or on earlier calls."""

import hashlib
import secrets

import torch


BLOCK = 16  # samples drawn per generator seed: the stream is the same whatever the chunk sizes


def fresh_seed() -> int:
    """A seed from the OS entropy pool: unseeded runs never repeat noise, and the seed can still be recorded."""
    return secrets.randbits(63)


def derive_digest(seed: int, *parts, fingerprint: bytes = b"") -> bytes:
    """
    The package's one seed scheme: SHA-256 of `"<seed>|<part>|...|<part>|"` followed by `fingerprint` (usually an
    [`image_fingerprint`]). Every seeded draw of an image (certification noise blocks, attack starts, training noise
    and augmentation) derives its generator from (seed, stream, ..., image) through this digest, so it never depends
    on batch position, chunking or earlier draws.
    """
    return hashlib.sha256("".join(f"{p}|" for p in (int(seed), *parts)).encode() + fingerprint).digest()


def derive_seed(seed: int, *parts, fingerprint: bytes = b"") -> int:
    """A 63-bit generator seed from [`derive_digest`] (its first 8 bytes, little-endian, top bit cleared)."""
    return int.from_bytes(derive_digest(seed, *parts, fingerprint=fingerprint)[:8], "little") & (2**63 - 1)


def image_fingerprint(image: torch.Tensor) -> bytes:
    """SHA-256 of a [0, 1] image tensor (shape and float32 values): the identity of an image for seeding."""
    data = image.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(repr(tuple(data.shape)).encode())
    digest.update(data.numpy().tobytes())
    return digest.digest()


class SeededNoise:
    """
    Standard normal noise for one image, as a stream of samples: sample i of stream `stream` is a function of
    (`seed`, `fingerprint`, `stream`, i) only. Samples are drawn in blocks of `BLOCK` from a generator seeded by a
    hash of those values, on the requested device (CPU and CUDA generators give different numbers).

    Args:
        seed (`int`): the run's seed.
        fingerprint (`bytes`): [`image_fingerprint`] of the image.
        stream (`str`): separates independent uses, e.g. `"selection"` (n0 samples) and `"estimation"` (n samples).
    """

    def __init__(self, seed: int, fingerprint: bytes, stream: str):
        self.seed, self.fingerprint, self.stream = int(seed), fingerprint, stream
        self._cached: tuple[int, torch.Tensor] | None = None

    def _block_seed(self, block: int) -> int:
        return derive_seed(self.seed, self.stream, block, fingerprint=self.fingerprint)

    def _block(self, block: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        if self._cached is not None and self._cached[0] == block and self._cached[1].device == device:
            return self._cached[1]
        generator = torch.Generator(device=device).manual_seed(self._block_seed(block))
        values = torch.randn((BLOCK, *shape), generator=generator, device=device)
        self._cached = (block, values)
        return values

    def sample(self, start: int, count: int, shape: tuple[int, ...], device: torch.device) -> torch.Tensor:
        """Samples `start .. start + count − 1` of the stream, `(count, *shape)` float32 on `device`."""
        parts, index = [], start
        while index < start + count:
            block, offset = divmod(index, BLOCK)
            take = min(BLOCK - offset, start + count - index)
            parts.append(self._block(block, tuple(shape), torch.device(device))[offset : offset + take])
            index += take
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()
