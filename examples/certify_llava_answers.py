"""Certified answers of the real-weight LLaVA (DINOv2-S/14 + SmolLM2-135M) smoothed at σ = 0.5 with the booster
shipped for it: "Which digit is this?" among the ten answers "The digit is k.", certified against every ℓ2 change of
the pixels up to a radius, offline. Sampling stops as soon as the target radius is certified (or out of reach).

    python examples/certify_llava_answers.py         # ≈ 1 min on 2 CPU cores with bf16 (AVX512-BF16 or AMX)
"""

import os


os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local: never wait on the network

from transformers import AutoModelForImageTextToText, AutoProcessor  # noqa: E402

import hf_feature_smoothing as hfs  # noqa: E402  (registers the smoothed models with the Auto classes)
from hf_feature_smoothing.assets.labelled_images import ANSWER_SETS, digit_examples  # noqa: E402
from hf_feature_smoothing.assets.llava_dinov2_smollm2 import REPO_ID, install_in_hub_cache, llava_checkpoint  # noqa: E402
from hf_feature_smoothing.assets.registry import SHIPPED_BOOSTER, resolve_booster_path  # noqa: E402
from hf_feature_smoothing.hub.sharing import certificate_eval_results  # noqa: E402
from hf_feature_smoothing.utils.hardware import bf16_supported  # noqa: E402


install_in_hub_cache(llava_checkpoint())  # the real weights, assembled offline into the Hub cache once
processor = AutoProcessor.from_pretrained(REPO_ID)
smoothing = {"sigma": 0.5, "booster": resolve_booster_path(SHIPPED_BOOSTER)}  # the booster: a folder or a Hub repo
model = AutoModelForImageTextToText.from_pretrained(REPO_ID, smoothing_config=smoothing)
question, answers = ANSWER_SETS["digits"]
candidates = hfs.CandidateAnswers.from_texts(processor.tokenizer, list(answers))
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)  # ends where the answer starts
dtype = "bfloat16" if bf16_supported() else None  # bf16 only where it is native: emulated it is ~7× slower

print(f"{question!r} among {len(answers)} answers; σ = {model.smoothing_config.sigma}, booster {SHIPPED_BOOSTER}")
certificates = []
for example in digit_examples("test", limit=4):  # held-out digits
    inputs = processor(images=[example.image], text=[prompt], return_tensors="pt")
    certificate = hfs.certify_answer(model, inputs, candidates, n0=16, n=500, alpha=0.001, target_radius=0.5,
                                     seed=0, autocast_dtype=dtype, label=example.label)
    certificates.append(certificate)
    verdict = "abstains" if certificate.answer is None else (
        f"{certificate.answer_text!r} ({'right' if certificate.correct else 'wrong'}) certified within ℓ2 radius "
        f"{certificate.radius:.3f}")
    print(f"{example.answer!r:>18}: {verdict} (p_A ≥ {certificate.p_lower:.3f}, {certificate.n_used} of "
          f"≤ {certificate.n} copies, stopped: {certificate.stop}, {certificate.dtype})")
print("Every certificate names what it covers:", sorted(certificate.to_dict()))
# with their labels they are certified answer accuracy per radius in a model card's model-index (`save_certified(model,
# folder, certificates=certificates)` writes the card with the weights); the entries alone:
for result in certificate_eval_results(certificates, "digits", radii=(0.0, 0.25, 0.5)):
    print(f"{result.metric_name}: {result.metric_value:.2f}")
