"""The sampling machinery of `certify` / `certify_prediction`: per-image noise streams, one job per image (its
selection and estimation plan), a fixed-block streaming sum, and the scheduler that fills each tower call with the
requests of several images. Memory stays independent of n: scores are reduced chunk by chunk."""

from collections.abc import Sequence

import torch
from torch import nn
from tqdm.auto import tqdm

from ..smoothing.modeling_smoothed_tower import NoisyCopies, SmoothedVisionTower
from ..smoothing.noise import BLOCK
from ..smoothing.towers import ImageInputs
from ..statistics.betting import BettingTest
from ..statistics.vote import VoteBound, top_class
from .inputs import pass_dtype


# ----- streaming reductions -------------------------------------------------------------------------------------
class BlockSum:
    """Σ of rows fed in arbitrary chunks, reduced in fixed blocks of `BLOCK` consecutive rows (float64 running total),
    so the result is bit-identical whatever the chunking; holds at most `BLOCK − 1` pending rows."""

    def __init__(self):
        self.total: torch.Tensor | None = None
        self.pending: torch.Tensor | None = None

    def add(self, rows: torch.Tensor) -> None:
        rows = rows if self.pending is None else torch.cat([self.pending, rows])
        full = rows.shape[0] - rows.shape[0] % BLOCK
        for start in range(0, full, BLOCK):
            self._accumulate(rows[start : start + BLOCK])
        self.pending = rows[full:].clone() if full < rows.shape[0] else None

    def _accumulate(self, block: torch.Tensor) -> None:
        part = block.sum(0).double()
        self.total = part if self.total is None else self.total + part

    def result(self) -> torch.Tensor:
        if self.pending is not None:
            self._accumulate(self.pending)
            self.pending = None
        return self.total


def _resolution(image: torch.Tensor, inputs: ImageInputs) -> list[int]:
    """[height, width] in pixels of the grid the noise lives on: the image's, or for patch-flattened towers (Qwen-VL:
    rows of `patch × patch` pixels) the patch grid `image_grid_thw` times the patch size."""
    if inputs.image_grid_thw is not None:
        _, height, width = (int(v) for v in inputs.image_grid_thw.reshape(-1, 3)[0])
        return [height * image.shape[-2], width * image.shape[-1]]
    return list(image.shape[-2:])


class ImageNoise:
    """The two independent noise streams of one image (selection: n0 samples; estimation: n samples)."""

    def __init__(self, tower: SmoothedVisionTower, inputs: ImageInputs, seed: int):
        self.resolution = _resolution(tower.family.to_image(inputs), inputs)
        self.selection, self.estimation = tower.noise_streams(inputs, seed, "selection", "estimation")


# ----- jobs: one image's sampling plan, fed by the batch runner ---------------------------------------------------
class CleanJob:
    """The clean unit feature f(x) of one image (one pass)."""

    def __init__(self, inputs: ImageInputs):
        self.inputs, self.feature, self.done = inputs, None, False

    def request(self, budget: int) -> NoisyCopies:
        return NoisyCopies(self.inputs, 1)

    def consume(self, sites: list[torch.Tensor]) -> None:
        self.feature, self.done = sites[-1][0].double(), True


class FeatureJob:
    """Reference direction v (clean pass, or n0 selection samples), then up to n estimation scores
    s = (1 + ⟨f(x + δ), v⟩)/2, stopping early once `target_score` is certified or out of reach."""

    def __init__(self, inputs: ImageInputs, noise: ImageNoise, reference: str, n0: int, n: int,
                 test: BettingTest | None):
        self.inputs, self.noise, self.reference, self.n0, self.n, self.test = inputs, noise, reference, n0, n, test
        self.v: torch.Tensor | None = None
        self.selection = BlockSum()
        self.drawn = 0
        self.scores: list[torch.Tensor] = []
        self.stop, self.done = "n", False

    def request(self, budget: int) -> NoisyCopies:
        if self.v is None and self.reference == "clean":
            return NoisyCopies(self.inputs, 1)
        if self.v is None:
            return NoisyCopies(self.inputs, min(budget, self.n0 - self.drawn), self.noise.selection, self.drawn)
        return NoisyCopies(self.inputs, min(budget, self.n - self.drawn), self.noise.estimation, self.drawn)

    def consume(self, sites: list[torch.Tensor]) -> None:
        features = sites[-1]
        if self.v is None:
            if self.reference == "clean":
                self.v = features[0].double()
            else:
                self.selection.add(features)
                self.drawn += features.shape[0]
                if self.drawn == self.n0:
                    self.v = nn.functional.normalize(self.selection.result(), dim=0)
                    self.drawn = 0
            return
        scores = ((1.0 + features.double() @ self.v) / 2.0).clamp(0.0, 1.0)
        if self.test is not None:
            reached, hopeless = self.test.update(scores)
            stop = min(t for t in (reached, hopeless) if t is not None) if reached or hopeless else None
            if stop is not None:
                scores = scores[: stop - self.drawn]
                self.stop = "target" if stop == reached else "unreachable"
        self.scores.append(scores.cpu())
        self.drawn += scores.shape[0]
        self.done = self.stop != "n" or self.drawn == self.n

    def all_scores(self) -> torch.Tensor:
        return torch.cat(self.scores)


class PredictionJob:
    """n0 selection samples choose y and the runner-ups; n estimation samples keep the scores of those classes and the
    largest score of the other classes (and, for the flat split, streaming moments Σp, Σp² of all K)."""

    def __init__(self, inputs: ImageInputs, noise: ImageNoise, prototypes: torch.Tensor, n0: int, n: int,
                 runner_ups: int, moments: bool):
        self.inputs, self.noise, self.prototypes, self.n0, self.n = inputs, noise, prototypes, n0, n
        self.runner_ups, self.track_moments = runner_ups, moments
        self.selection, self.moments = BlockSum(), BlockSum()
        self.classes: list[int] | None = None  # [y, runner-ups...]
        self.kept: list[torch.Tensor] = []
        self.drawn, self.done = 0, False

    def request(self, budget: int) -> NoisyCopies:
        if self.classes is None:
            return NoisyCopies(self.inputs, min(budget, self.n0 - self.drawn), self.noise.selection, self.drawn)
        return NoisyCopies(self.inputs, min(budget, self.n - self.drawn), self.noise.estimation, self.drawn)

    def consume(self, sites: list[torch.Tensor]) -> None:
        features = sites[-1]
        protos = self.prototypes.to(features.device)
        if self.classes is None:
            self.selection.add(features)
            self.drawn += features.shape[0]
            if self.drawn == self.n0:
                means = self.selection.result().float().to(features.device) @ protos.T / self.n0
                ranked = means.argsort(descending=True).tolist()
                self.classes, self.drawn = ranked[: self.runner_ups + 1], 0
                self.rest = torch.ones(len(ranked), dtype=torch.bool, device=features.device)
                self.rest[self.classes] = False
            return
        scores = ((1.0 + features @ protos.T) / 2.0).clamp(0.0, 1.0).double()
        rest_max = scores[:, self.rest].amax(1, keepdim=True) if self.rest.any() else scores[:, :0]
        self.kept.append(torch.cat([scores[:, self.classes], rest_max], dim=1).cpu())
        if self.track_moments:  # per-class bounds of the flat split
            self.moments.add(torch.cat([scores, scores.pow(2)], dim=1))
        self.drawn += scores.shape[0]
        self.done = self.drawn == self.n


class VoteJob:
    """Cohen et al.'s CERTIFY for the base classifier y(x + δ) = argmax_k cos(f(x + δ), t_k) on single noisy copies:
    n0 selection samples count each class's votes (only the K counts are kept) and choose ĉ_A; then up to n
    estimation samples feed the hits y = ĉ_A to a [`VoteBound`] (anytime-valid), until it is done."""

    def __init__(self, inputs: ImageInputs, noise: ImageNoise, prototypes: torch.Tensor, n0: int, bound: VoteBound):
        self.inputs, self.noise, self.prototypes, self.n0, self.bound = inputs, noise, prototypes, n0, bound
        self.counts = torch.zeros(prototypes.shape[0], dtype=torch.long)
        self.top: int | None = None
        self.drawn, self.done = 0, False

    def request(self, budget: int) -> NoisyCopies:
        if self.top is None:
            return NoisyCopies(self.inputs, min(budget, self.n0 - self.drawn), self.noise.selection, self.drawn)
        return NoisyCopies(self.inputs, min(budget, self.bound.n - self.drawn), self.noise.estimation, self.drawn)

    def consume(self, sites: list[torch.Tensor]) -> None:
        features = sites[-1]
        # unit prototypes: the largest inner product is the largest cosine
        votes = (features @ self.prototypes.to(features.device).T).argmax(1).cpu()
        self.drawn += votes.numel()
        if self.top is None:
            self.counts += torch.bincount(votes, minlength=self.counts.numel())
            if self.drawn == self.n0:
                self.top, self.drawn = top_class(self.counts), 0
            return
        self.done = self.bound.update(votes == self.top)


def check_finite_features(tower: SmoothedVisionTower, sites: list[torch.Tensor]) -> None:
    """Refuse NaN / inf features before they become scores: a NaN score passes every comparison unnoticed and would
    reach a certificate."""
    if all(torch.isfinite(features).all() for features in sites):
        return
    dtype = pass_dtype(tower)
    raise ValueError(
        f"The tower returned NaN or inf features for noisy copies at σ={tower.sigma:g} ({dtype}), so no certificate "
        "can be computed. Likely causes: noise too large for the tower's arithmetic (σ is in [0, 1] pixel units, "
        "e.g. `sigma=0.25`), a float16 / bfloat16 overflow (use `autocast_dtype=None`, float32), or non-finite "
        "weights (reload the checkpoint)."
    )


def run_jobs(tower: SmoothedVisionTower, jobs: Sequence, bar: tqdm | None = None) -> None:
    """Feed the jobs' requests to the tower until every job is done: each call takes up to `chunk_size` copies,
    filled image by image (images of the same pixel layout), so short requests of several images share a call."""
    chunk = tower.config.chunk_size
    pending = [job for job in jobs if not job.done]
    while pending:
        layout = pending[0].inputs.pixel_values.shape[1:]
        group, requests, left = [], [], chunk
        for job in pending:
            if left == 0:
                break
            if job.inputs.pixel_values.shape[1:] == layout:
                request = job.request(left)
                group.append(job)
                requests.append(request)
                left -= request.count
        for job, sites in zip(group, tower.unit_features_batch(requests)):
            check_finite_features(tower, sites)
            job.consume(sites)
            if job.done and bar is not None and isinstance(job, (FeatureJob, PredictionJob, VoteJob)):
                bar.update(1)
        pending = [job for job in pending if not job.done]


def blank_inputs(tower: SmoothedVisionTower, inputs: ImageInputs) -> ImageInputs:
    grey = torch.full_like(tower.family.to_image(inputs), 0.5)
    return inputs.with_pixels(tower.family.from_image(grey, inputs))


def blank_features(tower: SmoothedVisionTower, inputs_list: list[ImageInputs]) -> list[torch.Tensor]:
    """f(grey) for every image (one clean pass per distinct image layout)."""
    keys = [(tuple(i.pixel_values.shape), None if i.image_grid_thw is None else tuple(i.image_grid_thw.flatten().tolist()))
            for i in inputs_list]
    jobs = {}
    for key, inputs in zip(keys, inputs_list):
        jobs.setdefault(key, CleanJob(blank_inputs(tower, inputs)))
    run_jobs(tower, list(jobs.values()))
    return [jobs[key].feature for key in keys]

__all__ = ["BlockSum", "CleanJob", "FeatureJob", "ImageNoise", "PredictionJob", "VoteJob", "blank_features", "blank_inputs", "check_finite_features", "run_jobs"]
