"""Stage-1 alignment of `llava-dinov2-smollm2` (LLaVA's recipe): only the projector trains, the DINOv2 tower and the
SmolLM2 language model stay frozen. The tower is deterministic and frozen, so its features are computed once and
cached; each step runs the language model on (projected features, prompt, answer) and the loss is the
cross-entropy of the answer tokens. Training uses 🤗 `Trainer` (progress bar, logging, `resume_from_checkpoint`);
checkpoints hold only the projector."""

import json
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm
from transformers import Trainer, TrainingArguments

from ..utils.atomic import atomic_path
from ..utils.locking import RunLock
from ..utils.logging import get_logger
from ..version import __version__
from .labelled_images import VQAExample, digit_examples, textile_examples
from .llava_dinov2_smollm2 import IMAGE_TOKEN, build_llava, prompt_text
from .training_folder import SETTINGS_FILE, check_settings, last_checkpoint


logger = get_logger(__name__)
PROJECTOR_FILE = "projector.safetensors"
FEATURES_FILE = "tower_features.safetensors"


def answer_text(example: VQAExample) -> str:
    return f"{example.answer}<|im_end|>"


def tokenize(processor, example: VQAExample, image_tokens: int) -> tuple[list[int], list[int]]:
    """`(input_ids, labels)` of prompt + answer, the image expanded to `image_tokens` placeholders; labels are −100
    except on the answer tokens (the end-of-turn token included)."""
    tokenizer = processor.tokenizer
    prompt = tokenizer(prompt_text(example.question).replace(IMAGE_TOKEN, IMAGE_TOKEN * image_tokens),
                       add_special_tokens=False)["input_ids"]
    answer = tokenizer(answer_text(example), add_special_tokens=False)["input_ids"]
    return prompt + answer, [-100] * len(prompt) + answer


@torch.inference_mode()
def tower_features(model, processor, examples: list[VQAExample], batch_size: int = 32) -> torch.Tensor:
    """The features LLaVA feeds its projector (`hidden_states[vision_feature_layer]`, CLS kept), `(N, 65, 384)`."""
    parts = []
    for start in tqdm(range(0, len(examples), batch_size), desc="tower features"):
        images = [e.image for e in examples[start : start + batch_size]]
        pixel_values = processor.image_processor(images, return_tensors="pt")["pixel_values"]
        hidden = model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        parts.append(hidden[model.config.vision_feature_layer].float())
    return torch.cat(parts)


class ProjectorAlignment(nn.Module):
    """The frozen LLaVA with its trainable projector, scored on answer tokens given cached tower features."""

    def __init__(self, llava: nn.Module):
        super().__init__()
        self.llava = llava
        for name, param in llava.named_parameters():
            param.requires_grad_(name.startswith("model.multi_modal_projector."))

    def forward(self, features: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                labels: torch.Tensor) -> torch.Tensor:
        inner = self.llava.model
        embeds = inner.get_input_embeddings()(input_ids)
        projected = inner.multi_modal_projector(features).to(embeds.dtype)
        mask = (input_ids == self.llava.config.image_token_id).unsqueeze(-1)
        embeds = embeds.masked_scatter(mask, projected)
        hidden = inner.language_model(inputs_embeds=embeds, attention_mask=attention_mask).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != -100
        logits = self.llava.lm_head(hidden[:, :-1][keep])  # the LM head only where an answer token is predicted
        return nn.functional.cross_entropy(logits.float(), targets[keep])


class _Collator:
    def __init__(self, features: torch.Tensor, pad_id: int):
        self.features, self.pad_id = features, pad_id

    def __call__(self, rows: list[dict]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), self.pad_id)
        labels = torch.full((len(rows), length), -100)
        mask = torch.zeros(len(rows), length, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n], labels[i, :n], mask[i, :n] = torch.tensor(r["input_ids"]), torch.tensor(r["labels"]), 1
        return {"features": self.features[[r["index"] for r in rows]], "input_ids": ids, "attention_mask": mask,
                "labels": labels}


class ProjectorTrainer(Trainer):
    """`Trainer` whose checkpoints hold only the projector (`projector.safetensors`), and resume from it."""

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss = model(**inputs)
        return (loss, None) if return_outputs else loss

    def _projector(self) -> nn.Module:
        return self.accelerator.unwrap_model(self.model).llava.model.multi_modal_projector

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        folder = Path(output_dir or self.args.output_dir)
        folder.mkdir(parents=True, exist_ok=True)
        tensors = {k: v.detach().contiguous().cpu() for k, v in self._projector().state_dict().items()}
        save_file(tensors, str(folder / PROJECTOR_FILE))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        path = Path(resume_from_checkpoint) / PROJECTOR_FILE
        if not path.is_file():
            raise ValueError(f"`resume_from_checkpoint`={resume_from_checkpoint!r} has no {PROJECTOR_FILE}.")
        self._projector().load_state_dict(load_file(str(path)))


@torch.inference_mode()
def answer_accuracy(model, processor, examples: list[VQAExample], batch_size: int = 16, progress: bool = True,
                    per_example: bool = False) -> dict:
    """Held-out answer accuracy through the full model forward (pixels in, so smoothing and boosters apply): an
    example is correct when every answer token, end-of-turn included, is the argmax given the prompt and the
    answer's earlier tokens — exactly when greedy decoding emits the reference answer. Returns `accuracy`,
    `correct`, `total` and per-task accuracies; with `per_example`, also `hits` (one bool per example, in order)."""
    tokenizer = processor.tokenizer
    hits: dict[str, list[bool]] = {}
    ordered: list[bool] = []
    for start in tqdm(range(0, len(examples), batch_size), desc="answer accuracy", disable=not progress):
        batch = examples[start : start + batch_size]
        texts = [prompt_text(e.question) + answer_text(e) for e in batch]
        inputs = processor(images=[e.image for e in batch], text=texts, return_tensors="pt", padding=True)
        answers = [tokenizer(answer_text(e), add_special_tokens=False)["input_ids"] for e in batch]
        # right-padded: row r's answer is predicted from position length_r − len(answer) − 1 on
        begins = [int(inputs["attention_mask"][row].sum()) - len(a) - 1 for row, a in enumerate(answers)]
        first = min(begins)  # the vocabulary projection only from the first position that predicts an answer token
        logits = model(**inputs, logits_to_keep=inputs["input_ids"].shape[1] - first).logits
        for row, (example, answer, begin) in enumerate(zip(batch, answers, begins)):
            predicted = logits[row, begin - first : begin - first + len(answer)].argmax(-1).tolist()
            hits.setdefault(example.task, []).append(predicted == answer)
            ordered.append(predicted == answer)
    result = {"accuracy": sum(ordered) / len(ordered), "correct": sum(ordered), "total": len(ordered)}
    result.update({f"{task}_accuracy": sum(h) / len(h) for task, h in hits.items()})
    if per_example:
        result["hits"] = ordered
    return result


def training_examples(split: str) -> list[VQAExample]:
    return digit_examples(split) + textile_examples(split)


def train_projector(output_dir: str | os.PathLike, *, max_steps: int = 600, batch_size: int = 16,
                    learning_rate: float = 1e-3, seed: int = 0, resume: bool = True, evaluate: bool = True,
                    bf16: bool | None = None) -> Path:
    """
    Train the projector of `llava-dinov2-smollm2` on the training splits of the digits and textiles (1400 + 600
    images) and write `output_dir/projector.safetensors`, whose metadata records the training parameters and the
    held-out answer accuracy. Resumes from the last checkpoint in `output_dir` unless `resume=False`. `bf16`
    (default: where the hardware has native bf16) trains under bf16 autocast; the projector is stored in float32.
    """
    from ..utils.hardware import bf16_supported

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bf16 = bf16_supported(device) if bf16 is None else bf16
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    settings = {"max_steps": max_steps, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed,
                "bf16": bf16}
    with RunLock(output_dir):  # a second trainer of the same folder fails at once, naming the holder
        if not resume:  # a fresh start in this folder: its earlier settings no longer count
            (output_dir / SETTINGS_FILE).unlink(missing_ok=True)
        check_settings(output_dir, settings)
        return _train_projector(output_dir, settings, resume=resume, evaluate=evaluate, device=device)


def _train_projector(output_dir: Path, settings: dict, *, resume: bool, evaluate: bool, device: str) -> Path:
    max_steps, batch_size, learning_rate, seed, bf16 = (settings[k] for k in ("max_steps", "batch_size",
                                                                               "learning_rate", "seed", "bf16"))
    model, processor = build_llava(projector=None, seed=seed)
    train = training_examples("train")
    cached = output_dir / FEATURES_FILE
    if cached.is_file():
        features = load_file(str(cached))["features"]
    else:
        features = tower_features(model, processor, train)
        with atomic_path(cached) as tmp:  # a kill mid-write leaves no truncated cache
            save_file({"features": features}, str(tmp))
    image_tokens = features.shape[1]
    rows = []
    for index, example in enumerate(train):
        input_ids, labels = tokenize(processor, example, image_tokens)
        rows.append({"index": index, "input_ids": input_ids, "labels": labels})
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=max_steps, per_device_train_batch_size=batch_size,
        learning_rate=learning_rate, lr_scheduler_type="cosine", warmup_steps=max(1, max_steps // 20),
        weight_decay=0.0, logging_steps=10, save_steps=50, save_total_limit=2, seed=seed, report_to=[],
        remove_unused_columns=False, dataloader_drop_last=True, use_cpu=device == "cpu", bf16=bf16,
    )
    trainer = ProjectorTrainer(model=ProjectorAlignment(model), args=args, train_dataset=rows,
                               data_collator=_Collator(features, processor.tokenizer.pad_token_id))
    checkpoint = last_checkpoint(output_dir) if resume else None
    trainer.train(resume_from_checkpoint=str(checkpoint) if checkpoint else None)
    record = {"max_steps": max_steps, "batch_size": batch_size, "learning_rate": learning_rate, "seed": seed, "bf16": bf16,
              "train_images": {"digits": sum(e.task == "digits" for e in train),
                               "textiles": sum(e.task == "textiles" for e in train)},
              "final_loss": next((h["train_loss"] for h in reversed(trainer.state.log_history) if "train_loss" in h),
                                 math.nan),
              "hf_feature_smoothing": __version__}
    if evaluate:
        model.eval()
        record["held_out"] = answer_accuracy(model, processor, training_examples("test"))
        logger.info(f"Held-out answer accuracy: {record['held_out']}")
    tensors = {k: v.detach().contiguous() for k, v in model.model.multi_modal_projector.state_dict().items()}
    with atomic_path(output_dir / PROJECTOR_FILE) as tmp:
        save_file(tensors, str(tmp), metadata={"training": json.dumps(record)})
    return output_dir / PROJECTOR_FILE
