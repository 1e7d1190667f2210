"""How a `SmoothedVisionTower` hooks into an MLLM so its language model receives smoothed features: a pre-hook on the
tower replaces the call's pixels with noisy copy 1 (and conditions boosters on σ), a hook at each feature site adds
the Monte Carlo sums of copies 2..n (exactly n tower passes) and returns the smoothed feature. A mixin of
[`SmoothedVisionTower`], which supplies the noise, the Monte Carlo and the feature geometry it uses."""

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn

from .conditioning import restore_noise_condition, set_noise_condition
from .towers import ImageInputs


EPS = 1e-12  # floor of a norm before dividing by it


@dataclass
class SmoothedCall:
    """State of one hooked tower call: its clean inputs and the Monte Carlo sums of the other n − 1 copies."""

    inputs: ImageInputs
    sums: list[tuple[torch.Tensor, torch.Tensor]] | None = None
    sites_done: int = 0
    booster_levels: list | None = None


class MLLMHooksMixin:
    """`install` / `remove` the hooks that smooth an MLLM's vision features (see the module docstring)."""

    def install(self):
        """Hook smoothing into the model so the language model receives smoothed features. Idempotent."""
        if self._handles or not self.family.site_modules():
            return self
        tower = self.family.tower()
        self._handles.append(tower.register_forward_pre_hook(self._tower_pre_hook, with_kwargs=True))
        for index, module in enumerate(self.family.site_modules()):
            self._handles.append(self.family.register_site_hook(module, partial(self._site_hook, index)))
        return self

    def remove(self) -> None:
        """Remove the hooks: the model is the stock model again."""
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._end_call()

    def _end_call(self) -> None:
        """Forget the current call and give the boosters back their previous noise condition (also the end of a
        call that an exception interrupted between the tower's pre-hook and its last feature site)."""
        call, self._call = self._call, None
        if call is not None:
            restore_noise_condition(call.booster_levels or [])

    def _tower_pre_hook(self, module: nn.Module, args: tuple, kwargs: dict):
        if self.family.capturing:  # the Monte Carlo's own passes
            return None
        self._end_call()  # a call still open was interrupted: boosters must not stay conditioned on its σ
        if not self.enabled:
            return None
        inputs = self.family.inputs_from_call(args, kwargs)
        # copy #1 runs in the model's own call: condition boosters on σ
        self._call = SmoothedCall(inputs, booster_levels=set_noise_condition(self.encoder, self.sigma,
                                                                                *self.family.pixel_stats))
        noisy = self.add_noise(inputs, 1)
        return self.family.replace_call_pixels(args, kwargs, noisy.pixel_values)

    def _site_hook(self, index: int, features: torch.Tensor) -> torch.Tensor | None:
        call = self._call
        if self.family.capturing or call is None or not self.enabled:
            return None
        n = self.config.num_samples
        if call.sums is None:
            call.sums = self.monte_carlo(call.inputs, n - 1)
        primary = index == len(self.family.site_modules()) - 1
        rows = self.family.as_rows(features).float()
        if primary:
            rows = self._center(rows, channels=features.shape[-1])
        unit, norms = self._unit_rows(rows[None], call.inputs)
        unit_sum, norm_sum = unit[0], norms[0]
        if call.sums:
            unit_sum, norm_sum = unit_sum + call.sums[index][0], norm_sum + call.sums[index][1]
        seg = self._segments(call.inputs, rows.shape[0], rows.device)
        direction_norms = torch.zeros_like(norm_sum).index_add(0, seg, unit_sum.pow(2).sum(-1)).sqrt()
        smoothed = unit_sum * (norm_sum / n / direction_norms.clamp_min(EPS))[seg, None]
        if primary:
            smoothed = self._center(smoothed, sign=1.0, channels=features.shape[-1])  # the projector's raw space
        call.sites_done += 1
        if call.sites_done == len(self.family.site_modules()):
            self._end_call()
        return smoothed.to(features.dtype).view_as(features)
