"""A few GSBTrainer steps on a tiny LLaVA, as a function (for the single-process reference) and as a script (for
`accelerate launch --num_processes 2 --cpu tests/gsb_train_script.py OUT PER_DEVICE_BATCH [SEED]`)."""

import sys

import datasets
import numpy as np
import torch
from PIL import Image
from transformers import TrainingArguments

import hf_feature_smoothing as hfs
from hf_feature_smoothing.booster import GSBTrainer
from hf_feature_smoothing.testing_utils import tiny_smoothed_model


def dataset(num: int = 16) -> datasets.Dataset:
    rng = np.random.default_rng(0)
    images = [np.kron(rng.integers(0, 255, (6, 7, 3)), np.ones((10, 10, 1))).astype(np.uint8) for _ in range(num)]
    return datasets.Dataset.from_dict({"image": [Image.fromarray(a) for a in images]})


def train(output_dir: str, per_device_batch: int, seed: int = 0, steps: int = 3) -> None:
    model = tiny_smoothed_model("llava", num_samples=2)
    config = hfs.GSBConfig(sigmas=[0.25, 0.5], hidden_dim=32, mapper_mixing="attention",
                                      purifier={"width": 8, "depth": 3})
    booster = hfs.add_booster(model, config)
    args = TrainingArguments(output_dir, max_steps=steps, per_device_train_batch_size=per_device_batch,
                             learning_rate=1e-3, use_cpu=True, report_to=[], seed=seed, save_strategy="no",
                             logging_steps=1, disable_tqdm=True)
    # the stats term uses per-process batch statistics (like BatchNorm without sync): off for an exact comparison
    trainer = GSBTrainer(booster, args, train_dataset=dataset(), image_size=56, noise_samples=2, lambda_stats=0.0)
    trainer.train()
    trainer.save_model(output_dir)


if __name__ == "__main__":
    torch.set_num_threads(1)
    train(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]) if len(sys.argv) > 3 else 0)
    if torch.distributed.is_initialized():  # a clean shutdown: gloo threads left at exit can abort the process
        torch.distributed.destroy_process_group()
