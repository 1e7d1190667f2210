"""An MLLM as a classifier over a set of candidate answers ("The digit is 0." … "The digit is 9.", "A" … "D",
"The textile is nominal." / "The textile has a local defect." / …). Answers that share a prefix and then differ at
one token are scored by that token's logit: one teacher-forced forward pass of prompt + prefix scores every candidate
(what greedy decoding picks once it has emitted the prefix). Other sets are scored by each answer's teacher-forced
log-likelihood after the shared prefix: prompt + prefix runs once and its key/value cache scores every candidate's
remaining tokens (prompts of different lengths, or Qwen-VL's M-RoPE prompts: one batched pass of prompt + answer per
candidate). LLaVA-type models take `(B, 3, H, W)` pixels, Qwen-VL patch-flattened pixels with `image_grid_thw`."""

import hashlib
import inspect
import json
from dataclasses import dataclass

import torch
from torch import nn

from ..smoothing.towers import ImageInputs


TOKEN_TYPE_KEYS = ("mm_token_type_ids",)  # per-token inputs a prompt carries besides its ids (Qwen-VL's M-RoPE)


def _cache_name(model: nn.Module) -> str:
    """The forward's key/value cache argument (and output): `cache` since transformers 5.25, `past_key_values`
    before (the old name warns there and goes in 5.40)."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@dataclass(frozen=True)
class CandidateAnswers:
    """
    Tokenised candidate answers. `branch` is the first position where they differ; the tokens before it (`prefix`)
    are shared. When the tokens at it (`branch_tokens`) are all distinct (`single_branch`), the candidate whose token
    the model scores highest there is its answer (what greedy decoding picks once it has emitted the prefix);
    otherwise (e.g. "… is nominal." / "… has a local defect." / "… has a global defect.") the answer is the candidate
    of highest teacher-forced log-likelihood of its tokens from `branch` on. `base_classifier` says which.

    Args:
        token_ids (`tuple[tuple[int, ...], ...]`): each candidate's token ids.
        texts (`tuple[str, ...]`): the candidates as text (what certificates and cards show).
    """

    token_ids: tuple[tuple[int, ...], ...]
    texts: tuple[str, ...]

    def __post_init__(self):
        if len(self.token_ids) < 2 or len(self.token_ids) != len(self.texts):
            raise ValueError(f"`candidates` must hold at least two answers, one text each; got {list(self.texts)!r}.")
        if any(not ids for ids in self.token_ids):
            raise ValueError(f"every candidate answer needs at least one token; got {list(self.texts)!r}.")
        if len(set(self.token_ids)) != len(self.token_ids):
            raise ValueError(f"the candidate answers {list(self.texts)!r} tokenise to the same tokens twice; give "
                             "distinct answers.")
        prefixes = [(a, b) for a, ids in enumerate(self.token_ids) for b, other in enumerate(self.token_ids)
                    if a != b and other[: len(ids)] == ids]
        if prefixes:  # its log-likelihood (or missing branch token) could never beat the longer answer fairly
            a, b = prefixes[0]
            raise ValueError(f"the candidate answer {self.texts[a]!r} is a prefix of {self.texts[b]!r} (as tokens), "
                             "so it cannot be scored against it; end every answer with the end-of-turn token "
                             "(`CandidateAnswers.from_texts(..., suffix=<end-of-turn>)`) or reword them.")

    @property
    def single_branch(self) -> bool:
        """The candidates differ at one token (`branch`): one forward pass of prompt + prefix scores them all."""
        heads = [ids[self.branch] for ids in self.token_ids]
        return len(set(heads)) == len(heads)

    @property
    def base_classifier(self) -> str:
        """What the candidate choice on one input is, in words (recorded in certificates)."""
        if self.single_branch:
            return "argmax of the candidates' branch-token logits"
        return "argmax of the candidates' teacher-forced log-likelihood from their first distinct token"

    @classmethod
    def from_texts(cls, tokenizer, texts: list[str], suffix: str = "") -> "CandidateAnswers":
        """Tokenise `texts` (each followed by `suffix`, e.g. the end-of-turn token) without special tokens."""
        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise ValueError(f"`candidates` must be a list of answer strings, got {texts!r}.")
        ids = tuple(tuple(tokenizer(f"{t}{suffix}", add_special_tokens=False)["input_ids"]) for t in texts)
        return cls(ids, tuple(texts))

    @property
    def branch(self) -> int:
        position = 0
        while all(len(ids) > position for ids in self.token_ids) and len(
                {ids[position] for ids in self.token_ids}) == 1:
            position += 1
        return position

    @property
    def prefix(self) -> list[int]:
        return list(self.token_ids[0][: self.branch])

    @property
    def branch_tokens(self) -> list[int]:
        return [ids[self.branch] for ids in self.token_ids]

    def digest(self) -> str:
        """SHA-256 (16 hex digits) of the candidates' token ids: names the candidate set in certificates."""
        return hashlib.sha256(json.dumps([list(ids) for ids in self.token_ids]).encode()).hexdigest()[:16]

    def index(self, answer_ids: list[int]) -> int | None:
        """The candidate whose tokens are `answer_ids`, or None."""
        return next((k for k, ids in enumerate(self.token_ids) if list(ids) == list(answer_ids)), None)

    def with_prefix(self, inputs: dict, pad_token_id: int) -> tuple[dict, torch.Tensor]:
        """`input_ids` / `attention_mask` of each prompt followed by the shared prefix (right-padded), the token type
        ids of `inputs` (`TOKEN_TYPE_KEYS`: Qwen-VL's `mm_token_type_ids`) carried along with 0 (text) on the prefix
        and the padding, and the position of each row's last token (whose logits score the branch token). Other
        entries of `inputs` (the pixels) are not part of the prompt."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        kept = [mask[row].bool() for row in range(len(ids))]
        rows = [ids[row][kept[row]].tolist() + self.prefix for row in range(len(ids))]
        length = max(len(r) for r in rows)
        full_ids = torch.full((len(rows), length), pad_token_id, dtype=ids.dtype)
        full_mask = torch.zeros((len(rows), length), dtype=mask.dtype)
        for row, tokens in enumerate(rows):
            full_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
            full_mask[row, : len(tokens)] = 1
        prefixed = {"input_ids": full_ids.to(ids.device), "attention_mask": full_mask.to(ids.device)}
        for key in TOKEN_TYPE_KEYS:
            value = inputs.get(key)
            if value is None:
                continue
            if not torch.is_tensor(value) or value.shape != ids.shape:
                raise ValueError(f"`{key}` must have the shape of `input_ids` {tuple(ids.shape)}, got "
                                 f"{tuple(value.shape) if torch.is_tensor(value) else type(value).__name__}.")
            aligned = torch.zeros((len(rows), length), dtype=value.dtype)
            for row in range(len(rows)):
                values = value[row][kept[row]].cpu()
                aligned[row, : len(values)] = values
            prefixed[key] = aligned.to(value.device)
        positions = torch.tensor([len(r) - 1 for r in rows])
        return prefixed, positions

    def scores(self, model: nn.Module, prefixed: dict, positions: torch.Tensor, pixel_values: torch.Tensor,
               image_grid_thw: torch.Tensor | None = None) -> torch.Tensor:
        """`(B, C)` float32 scores of the candidates on the inputs of [`with_prefix`]: the logits of each candidate's
        branch token (`single_branch`), else each candidate's log-likelihood of its tokens from `branch` on (prompt +
        prefix once, its cache repeated per candidate; prompts of different lengths and Qwen-VL's M-RoPE prompts: the
        B prompts × C candidates in one batched pass). Their argmax is the model's answer among the candidates.
        `pixel_values` (and `image_grid_thw`, Qwen-VL) hold the images of the B prompts, in order.
        Differentiable in `pixel_values`."""
        images = ImageInputs(pixel_values, image_grid_thw)
        if self.single_branch:
            length = prefixed["input_ids"].shape[1]
            keep = length - int(positions.min())  # the vocabulary projection only where a score is read
            logits = model(**prefixed, **images.model_kwargs(), logits_to_keep=keep).logits
            rows = torch.arange(len(positions), device=logits.device)
            return logits[rows, positions.to(logits.device) - (length - keep)][:, self.branch_tokens].float()
        return self._log_likelihoods(model, prefixed, positions, images)

    def _remainders(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        """`(C, T)` each candidate's tokens from `branch` on (0-padded) and where they are real."""
        steps = max(len(t) for t in self.token_ids) - self.branch
        rests = torch.zeros((len(self.token_ids), steps), dtype=torch.long)
        valid = torch.zeros((len(self.token_ids), steps), dtype=torch.bool)
        for c, tokens in enumerate(self.token_ids):
            rests[c, : len(tokens) - self.branch] = torch.tensor(tokens[self.branch :])
            valid[c, : len(tokens) - self.branch] = True
        return rests.to(device), valid.to(device)

    def _log_likelihoods(self, model: nn.Module, prefixed: dict, positions: torch.Tensor,
                         images: ImageInputs) -> torch.Tensor:
        ids = prefixed["input_ids"]
        # no row padded (copies of one prompt): share its cache. Not with M-RoPE (Qwen-VL): positions after a cached
        # multimodal prompt hang on the rope deltas the model stores between calls; a whole row needs no such state
        if images.image_grid_thw is None and bool((positions == ids.shape[1] - 1).all()):
            return self._cached_log_likelihoods(model, prefixed, images.pixel_values)
        return self._repeated_log_likelihoods(model, prefixed, positions, images)

    def _cached_log_likelihoods(self, model: nn.Module, prefixed: dict, pixel_values: torch.Tensor) -> torch.Tensor:
        """Prompts of one length: prompt + prefix (the image included) runs once, and its key/value cache, repeated
        per candidate, scores the candidates' remainders, so C candidates cost little more than one."""
        ids, mask = prefixed["input_ids"], prefixed["attention_mask"]
        count, batch = len(self.token_ids), len(ids)
        rests, valid = self._remainders(ids.device)
        targets, keep = rests.repeat(batch, 1), valid.repeat(batch, 1)  # row b·C + c: prompt b, candidate c
        out = model(input_ids=ids, attention_mask=mask, pixel_values=pixel_values, use_cache=True, logits_to_keep=1)
        first = out.logits[:, -1].float().log_softmax(-1)[:, rests[:, 0]]  # (B, C): each candidate's first token
        picked = [first.reshape(-1, 1)]
        if targets.shape[1] > 1:  # teacher-force the rest after the cached prompt (a pad after a short answer: unread)
            name = _cache_name(model)
            cache = getattr(out, name)
            cache.batch_repeat_interleave(count)
            follow_mask = torch.cat([mask.repeat_interleave(count, dim=0), keep[:, :-1].to(mask.dtype)], dim=1)
            logits = model(input_ids=targets[:, :-1].to(ids.dtype), attention_mask=follow_mask, use_cache=True,
                           **{name: cache}).logits
            picked.append(logits.float().log_softmax(-1).gather(-1, targets[:, 1:, None])[..., 0])
        return torch.cat(picked, dim=1).masked_fill(~keep, 0.0).sum(-1).view(batch, count)

    def _repeated_log_likelihoods(self, model: nn.Module, prefixed: dict, positions: torch.Tensor,
                                  images: ImageInputs) -> torch.Tensor:
        """Prompt + prefix + candidate for every pair, batched (right-padded; token-aligned inputs such as
        `mm_token_type_ids` are 0 on the candidate tokens)."""
        ids, mask = prefixed["input_ids"], prefixed["attention_mask"]
        count = len(self.token_ids)
        rests, valid = self._remainders(ids.device)
        steps = rests.shape[1]
        ends = positions.to(ids.device).repeat_interleave(count)  # row b·C + c: prompt b + prefix + candidate c
        rows = torch.arange(len(ends), device=ids.device)
        span = ends[:, None] + 1 + torch.arange(steps, device=ids.device)  # where each remainder token goes
        full = {key: torch.cat([value.repeat_interleave(count, dim=0),
                                torch.zeros((len(ends), steps), dtype=value.dtype, device=value.device)], dim=1)
                for key, value in prefixed.items()}
        targets, keep = rests.to(ids.dtype).repeat(len(positions), 1), valid.repeat(len(positions), 1)
        full["input_ids"][rows[:, None], span] = torch.where(keep, targets, full["input_ids"][rows[:, None], span])
        full["attention_mask"][rows[:, None], span] = keep.to(mask.dtype)
        skipped = int(ends.min())  # the vocabulary projection only from the first scored position on
        logits = model(**full, **_repeat_each(images, len(positions), count).model_kwargs(), use_cache=False,
                       logits_to_keep=full["input_ids"].shape[1] - skipped).logits
        # the logits that predict each remainder token sit one position before it; log-softmax only there
        log_probs = logits[rows[:, None], span - 1 - skipped].float().log_softmax(-1)
        picked = log_probs.gather(-1, targets[..., None].to(log_probs.device))[..., 0]
        return picked.masked_fill(~keep, 0.0).sum(-1).view(len(positions), count)  # padding: 0, never −inf · 0


def _repeat_each(images: ImageInputs, prompts: int, count: int) -> ImageInputs:
    """The images of each of `prompts` prompts, `count` times in a row (prompt-major, as the repeated rows)."""
    if images.image_grid_thw is None:
        return ImageInputs(images.pixel_values.repeat_interleave(count, dim=0))
    grid = images.image_grid_thw
    if len(grid) % prompts:
        raise ValueError(f"`image_grid_thw` holds {len(grid)} images for {prompts} prompts; give each prompt as many.")
    per_prompt = grid.view(prompts, -1, grid.shape[-1])
    blocks = images.pixel_values.split(per_prompt.prod(-1).sum(-1).tolist())
    return ImageInputs(torch.cat([block for block in blocks for _ in range(count)]),
                       per_prompt.repeat_interleave(count, dim=0).reshape(-1, grid.shape[-1]))


__all__ = ["CandidateAnswers"]
