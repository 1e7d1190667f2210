"""An MLLM as a classifier over a set of candidate answers ("The digit is 0." … "The digit is 9.", "A" … "D"):
the answers share a prefix and differ at one token, so one teacher-forced forward pass of prompt + prefix scores
every candidate of every image at once."""

import hashlib
import json
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CandidateAnswers:
    """
    Tokenised candidate answers. `branch` is the first position where they differ: the tokens before it (`prefix`)
    are shared and the tokens at it (`branch_tokens`) are distinct, so the candidate the model scores highest there
    is its answer among the candidates (what greedy decoding picks when it emits the prefix).

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
        heads = [ids[self.branch] if self.branch < len(ids) else None for ids in self.token_ids]
        if None in heads or len(set(heads)) != len(heads):
            raise ValueError(
                f"the candidate answers {list(self.texts)!r} must share a prefix and then differ at one token "
                f"(position {self.branch}), so that one forward pass scores them all; reword them (e.g. 'The digit "
                "is 3.') or give answers whose first distinct tokens differ.")

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
        """`input_ids` / `attention_mask` of each prompt followed by the shared prefix (right-padded), and the position
        of each row's last token (whose logits score the branch token)."""
        ids = inputs["input_ids"]
        mask = inputs.get("attention_mask", torch.ones_like(ids))
        rows = [ids[row][mask[row].bool()].tolist() + self.prefix for row in range(len(ids))]
        length = max(len(r) for r in rows)
        full_ids = torch.full((len(rows), length), pad_token_id, dtype=ids.dtype)
        full_mask = torch.zeros((len(rows), length), dtype=mask.dtype)
        for row, tokens in enumerate(rows):
            full_ids[row, : len(tokens)] = torch.tensor(tokens, dtype=ids.dtype)
            full_mask[row, : len(tokens)] = 1
        positions = torch.tensor([len(r) - 1 for r in rows])
        return {"input_ids": full_ids.to(ids.device), "attention_mask": full_mask.to(ids.device)}, positions

    def scores(self, model: nn.Module, prefixed: dict, positions: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """`(B, C)` float32 logits of each candidate's branch token (the inputs of [`with_prefix`]); their argmax is
        the model's answer among the candidates. Differentiable in `pixel_values`."""
        logits = model(**prefixed, pixel_values=pixel_values).logits
        rows = torch.arange(len(positions), device=logits.device)
        return logits[rows, positions.to(logits.device)][:, self.branch_tokens].float()


__all__ = ["CandidateAnswers"]
