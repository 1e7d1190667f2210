"""An MLLM with a candidate answer set seen as an image classifier on [0, 1] pixels, the view classifier attacks
(the reference AutoAttack code among them) expect: `classifier(images) -> (B, C) logits`."""

import torch
from torch import nn

from ..models.answers import CandidateAnswers
from ..smoothing.towers import ImageInputs
from ..utils.validation import check_images
from .feature import _check_attack, check_confirm_share
from .optim import BatchedAttack, eot_gradient, run_batched_attack
from .text import pixel_adapter


class AnswerClassifier(nn.Module):
    """
    `forward(images)` maps `(B, 3, H, W)` images in [0, 1] to the `(B, C)` logits of the candidates' branch tokens
    ([`~models.answers.CandidateAnswers`]) after one prompt, asked of every image. A smoothed model draws fresh noise
    at every call, so the classifier is randomised exactly as the smoothed model is.

    Args:
        model (`nn.Module`): a LLaVA-type MLLM, stock or smoothed (with or without a booster).
        prompt_inputs (`dict`): processor outputs of one prompt (`input_ids`, `attention_mask`, `pixel_values` of one
            image, whose shape the images must have); the prompt ends where the answer starts.
        candidates ([`CandidateAnswers`]): the answers, class k being `candidates.texts[k]`.
        pad_token_id (`int`): the tokenizer's padding id.
    """

    def __init__(self, model: nn.Module, prompt_inputs: dict, candidates: CandidateAnswers, pad_token_id: int = 0,
                 image_mean=None, image_std=None):
        super().__init__()
        if prompt_inputs["input_ids"].shape[0] != 1:
            raise ValueError("`prompt_inputs` must hold one prompt (every image is asked the same question), got "
                             f"{prompt_inputs['input_ids'].shape[0]}.")
        self.model, self.candidates = model, candidates
        self.adapter = pixel_adapter(model, image_mean, image_std)
        self.prefixed, self.positions = candidates.with_prefix(prompt_inputs, pad_token_id)
        self.template = prompt_inputs["pixel_values"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        check_images("images", images, 4)
        batch = images.shape[0]
        pixels = self.adapter.from_image(images, ImageInputs(self.template.expand(batch, *self.template.shape[1:])))
        prefixed = {key: value.expand(batch, -1) for key, value in self.prefixed.items()}
        return self.candidates.scores(self.model, prefixed, self.positions.expand(batch), pixels)


def classifier_attack(classifier: nn.Module, images: torch.Tensor, labels: torch.Tensor, epsilon: float, *,
                      norm: str = "linf", steps: int = 100, eot_samples: int = 1, targets: torch.Tensor | None = None,
                      stop_at_success: bool = True, confirm_runs: int = 0, confirm_share: float = 0.5,
                      generator: torch.Generator | None = None) -> BatchedAttack:
    """
    APGD on the cross-entropy of a (possibly randomised) classifier of [0, 1] images: untargeted (raise the CE of
    `labels`) or targeted (lower the CE of `targets`), gradients averaged over `eot_samples` calls (EOT), each
    image retired once most of a step's calls give the attack's class and, with `confirm_runs` > 0, more than
    `confirm_share` of that many fresh calls confirm it (as [`answer_attack`] does with its `eval_runs`). The
    classifier-view twin of [`answer_attack`], for comparisons with classifier attacks such as AutoAttack's APGD-CE.
    """
    _check_attack(epsilon, norm, steps, eot_samples, 1, 1)
    check_confirm_share(confirm_share)
    if isinstance(confirm_runs, bool) or not isinstance(confirm_runs, int) or confirm_runs < 0:
        raise ValueError(f"`confirm_runs` must be an int ≥ 0 (0: no confirmation), got {confirm_runs!r}.")
    check_images("images", images, 4)
    attacked = labels if targets is None else targets
    sign = -1.0 if targets is None else 1.0

    def loss_and_grad(delta: torch.Tensor, rows: torch.Tensor | None = None):
        rows = torch.arange(len(images), device=images.device) if rows is None else rows
        index = rows.cpu()

        def goal(logits: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
            predicted = logits.detach().argmax(-1).cpu()
            return predicted != labels[index].cpu() if targets is None else predicted == targets[index].cpu()

        def one_pass(delta: torch.Tensor):
            logits = classifier(images[rows] + delta)
            losses = sign * nn.functional.cross_entropy(logits, attacked[index].to(logits.device), reduction="none")
            return losses, goal(logits, index)

        total, grad, hits = eot_gradient(one_pass, delta, eot_samples)
        if not stop_at_success:
            return total, grad
        hit = hits.nonzero().squeeze(1)
        if confirm_runs and len(hit):  # confirm on fresh calls before retiring: one lucky noise draw is no success
            confirmed = torch.zeros(len(hit))
            with torch.no_grad():
                for _ in range(confirm_runs):
                    confirmed += goal(classifier(images[rows[hit]] + delta[hit].detach()), index[hit]).float()
            hits = hits.clone()
            hits[hit] = confirmed > confirm_share * confirm_runs
        return total, grad, hits

    return run_batched_attack(loss_and_grad, images, epsilon, norm=norm, steps=steps, algorithm="apgd",
                              generator=generator, stop_at_success=stop_at_success)


@torch.no_grad()
def majority_predictions(classifier: nn.Module, images: torch.Tensor, runs: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image the class most of `runs` calls give (a smoothed model draws fresh noise at each) and the fraction
    of calls giving it. A tie has no majority: count an image robust only when that fraction exceeds ½."""
    votes = torch.stack([classifier(images).argmax(-1).cpu() for _ in range(max(1, runs))])
    top = votes.mode(dim=0).values
    return top, (votes == top).float().mean(0)


__all__ = ["AnswerClassifier", "classifier_attack", "majority_predictions"]
