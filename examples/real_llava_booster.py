"""The real-weight LLaVA (DINOv2-S/14 + SmolLM2-135M) smoothed at a noise level where it no longer answers on its own,
and again with the Gaussian Smoothness Booster shipped for it: generated answers and certificates, offline.

    python examples/real_llava_booster.py            # ≈ 2 min on 2 CPU cores
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on the network

import torch  # noqa: E402
from transformers import AutoProcessor  # noqa: E402

import hf_feature_smoothing as hfs  # noqa: E402
from hf_feature_smoothing.assets.labelled_images import digit_examples  # noqa: E402
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import (  # noqa: E402
    MODEL_NAME,
    REPO_ID,
    install_in_hub_cache,
    llava_checkpoint,
)
from hf_feature_smoothing.assets.registry import SHIPPED_BOOSTER, resolve_booster_path, resolve_model  # noqa: E402


install_in_hub_cache(llava_checkpoint())  # assembled offline once, then a checkpoint like any other
processor = AutoProcessor.from_pretrained(REPO_ID)
examples = digit_examples("test")[:6]  # held-out digits
smoothing = {"sigma": 0.5, "num_samples": 8, "seed": 0}
models = {  # the built-in alias as its smoothed class, like AutoModelForImageTextToText(REPO_ID, smoothing=...)
    "smoothed": resolve_model(MODEL_NAME, smoothing_config=smoothing),
    "smoothed + GSB": resolve_model(MODEL_NAME, smoothing_config={**smoothing, "booster": resolve_booster_path(SHIPPED_BOOSTER)}),
}
question = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": examples[0].question}]}]
prompt = processor.apply_chat_template(question, add_generation_prompt=True)
for name, model in models.items():
    print(f"--- {name} (σ = {model.smoothing_config.sigma}, n = {model.smoothing_config.num_samples})")
    for example in examples:
        inputs = processor(images=[example.image], text=[prompt], return_tensors="pt")
        with torch.no_grad():
            generated = model.generate(**inputs, max_new_tokens=8, do_sample=False)
        answer = processor.tokenizer.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"{example.answer!r:>22} → {answer.strip()!r}")
    certificates = hfs.certify(model, [e.image for e in examples[:2]], epsilon=[0.1, 0.25], n=128, seed=0)
    for certificate in certificates:
        print(f"S_low {certificate.score_lower:.4f}, certified cosine at ε = 0.1 / 0.25: "
              + " / ".join("none" if v is None else f"{v:.3f}" for v in certificate.fcsb))
