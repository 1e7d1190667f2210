"""Image geometry of one tower call, for boosters that need it: the patch grid of every image (read from the call of
the family's `grid_source` module) and, from it, where each image's tokens sit at the feature site."""

from dataclasses import dataclass

import torch
from torch import nn

from ..smoothing.towers import BoosterGeometry


@dataclass
class TokenLayout:
    """
    Token layout of one call at the booster site, as row indices into the site features flattened to `(rows, D)`.

    Args:
        segments (`list[torch.Tensor]`): one `(S, L)` index tensor per group of images with `L` tokens each: row `s`
            holds all tokens of one image (CLS included). Attention mixes within a row only.
        grids (`list[torch.Tensor]`): one `(F, h, w)` index tensor per group of frames with an `h × w` patch grid: the
            patch tokens in raster order. Prefix tokens (CLS) are in no grid.
    """

    segments: list[torch.Tensor]
    grids: list[torch.Tensor]


def grid_from_call(geometry: BoosterGeometry, args: tuple, kwargs: dict) -> torch.Tensor:
    """`(num_images, 3)` patch grids `(t, h, w)` of the images in a call of the geometry's `grid_source` module."""
    if geometry.patch_flattened:
        grid = kwargs.get("grid_thw", args[1] if len(args) > 1 else None)
        if grid is None:
            raise ValueError("The Qwen-VL vision tower was called without `grid_thw`; the booster needs each image's grid.")
        return torch.as_tensor(grid).long().cpu()
    pixels = args[0] if args else next(v for v in kwargs.values() if isinstance(v, torch.Tensor))
    height, width = pixels.shape[-2] // geometry.patch_size, pixels.shape[-1] // geometry.patch_size
    return torch.tensor([[1, height, width]], dtype=torch.long).expand(pixels.shape[0], 3)


def _group(keys: list, values: list[torch.Tensor]) -> list[torch.Tensor]:
    groups: dict = {}
    for key, value in zip(keys, values):
        groups.setdefault(key, []).append(value)
    return [torch.cat(v) if v[0].ndim == 3 else torch.stack(v) for v in groups.values()]


def batched_layout(grid: torch.Tensor, batch: int, length: int, device: torch.device) -> TokenLayout:
    """Layout of `(B, L, D)` site features: image b holds rows b·L .. b·L + L − 1, its first L − h·w tokens are
    prefix tokens (CLS), the rest its patch grid in raster order."""
    if grid.shape[0] != batch:
        raise RuntimeError(f"The booster site got features of {batch} images but the tower call had {grid.shape[0]}.")
    height, width = int(grid[0, 1]), int(grid[0, 2])
    prefix = length - height * width
    if prefix < 0:
        raise ValueError(
            f"Token mixing needs every patch token of the {height}×{width} grid at the booster site, but it holds "
            f"{length} token(s) per image (a pooled feature, or `vision_feature_select_strategy='default'` on a tower "
            "without a CLS token). Use `mapper_mixing=None` or boost a site that keeps the patch tokens."
        )
    rows = torch.arange(batch * length, device=device).view(batch, length)
    patches = rows[:, prefix:].reshape(batch, height, width)
    return TokenLayout(segments=[rows], grids=[patches])


def flat_layout(grid: torch.Tensor, num_rows: int, merge: int, unit_order: torch.Tensor | None,
                device: torch.device) -> TokenLayout:
    """Layout of Qwen-VL's `(Σ t·h·w, D)` merger input: image i holds t·h·w consecutive rows in m×m merge-window
    order, merge units permuted by `unit_order` (Qwen2.5-VL's window index) when given."""
    counts = grid.prod(-1)
    if int(counts.sum()) != num_rows:
        raise RuntimeError(f"The booster site got {num_rows} rows but the tower call's `grid_thw` describes "
                           f"{int(counts.sum())} patches.")
    inverse = torch.argsort(unit_order.to(device)) if unit_order is not None else None
    starts = torch.cumsum(counts, 0) - counts
    segments, grids, lengths, shapes = [], [], [], []
    for (t, h, w), start in zip(grid.tolist(), starts.tolist()):
        segments.append(torch.arange(start, start + t * h * w, device=device))
        lengths.append(t * h * w)
        f = torch.arange(t, device=device)[:, None, None]
        y = torch.arange(h, device=device)[None, :, None]
        x = torch.arange(w, device=device)[None, None, :]
        unit = start // merge**2 + f * (h // merge) * (w // merge) + (y // merge) * (w // merge) + x // merge
        if inverse is not None:
            unit = inverse[unit]
        grids.append(unit * merge**2 + (y % merge) * merge + x % merge)
        shapes.append((h, w))
    return TokenLayout(segments=_group(lengths, segments), grids=_group(shapes, grids))


class GridProbe:
    """
    Records the patch grid of the calls of a `grid_source` module for one booster layer: a forward pre-hook pushes
    it, a forward hook (run even when the call raises) pops it. The current grid is that of the innermost running
    call, else of the latest finished one: smoothing nests Monte Carlo tower calls inside the model's own call
    (Qwen-VL's site sits inside the tower call, LLaVA's after it). `need_order` also records the family's site
    permutation (Qwen2.5-VL window order).
    """

    def __init__(self, geometry: BoosterGeometry, need_order: bool = False):
        self.geometry, self.need_order = geometry, need_order
        self._running: list[tuple[torch.Tensor, torch.Tensor | None]] = []
        self._latest: tuple[torch.Tensor, torch.Tensor | None] | None = None
        self.handles: list[torch.utils.hooks.RemovableHandle] = []

    def attach(self, module: nn.Module) -> None:
        if not self.handles:
            self.handles = [module.register_forward_pre_hook(self._push, with_kwargs=True),
                            module.register_forward_hook(self._pop, always_call=True)]

    def detach(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _push(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        grid = grid_from_call(self.geometry, args, kwargs)
        order = None
        if self.need_order and self.geometry.site_order is not None:
            order = self.geometry.site_order(module, grid)
        self._running.append((grid, order))

    def _pop(self, module: nn.Module, args: tuple, output) -> None:
        if self._running:
            self._latest = self._running.pop()

    def current(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(grid, unit_order)` of the innermost running call of the grid source, else of the latest one."""
        current = self._running[-1] if self._running else self._latest
        if current is None:
            raise RuntimeError("No tower call was recorded before the booster: it needs each image's patch grid, "
                               "read when the vision tower runs.")
        return current

    @property
    def grid(self) -> torch.Tensor:
        return self.current()[0]

    def layout(self, features: torch.Tensor) -> TokenLayout:
        """Token layout of `features` (site features of the current call)."""
        grid, order = self.current()
        if self.geometry.patch_flattened:
            rows = features.reshape(-1, features.shape[-1]).shape[0]
            return flat_layout(grid, rows, self.geometry.merge_size, order, features.device)
        length = features.shape[1] if features.ndim == 3 else 1
        return batched_layout(grid, features.shape[0], length, features.device)
