"""Wrap a LLaVA checkpoint with Feature-space Smoothing, save it, reload it in one line, generate.

    python examples/smoothed_llava_generate.py
"""

import tempfile

import torch
from transformers import AutoModelForImageTextToText

import hf_feature_smoothing as hfs
from hf_feature_smoothing.testing_utils import tiny_inputs, tiny_model


with tempfile.TemporaryDirectory() as stock_dir, tempfile.TemporaryDirectory() as smoothed_dir:
    tiny_model("llava").save_pretrained(stock_dir)  # stands in for e.g. "llava-hf/llava-1.5-7b-hf"
    model = hfs.SmoothedLlavaForConditionalGeneration.from_pretrained(
        stock_dir, smoothing=hfs.FeatureSmoothingConfig(sigma=0.25, num_samples=8)
    )
    model.save_pretrained(smoothed_dir)
    reloaded = AutoModelForImageTextToText.from_pretrained(smoothed_dir)  # a SmoothedLlava..., σ from config.json
    inputs = tiny_inputs(reloaded)
    with torch.no_grad():
        print(type(reloaded).__name__, reloaded.smoothing_config)
        print(reloaded.generate(**inputs, max_new_tokens=5, do_sample=False))
