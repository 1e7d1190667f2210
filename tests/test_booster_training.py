"""GSBTrainer: the language model in the loop, data formats and augmentation, purifier pretraining, trainable parts,
and distributed training that matches one process."""

import io
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from peft import PeftConfig
from PIL import Image
from safetensors.torch import load_file
from transformers import TrainingArguments

import hf_feature_smoothing as hfs
from hf_feature_smoothing import FeatureSmoothingConfig, GSBConfig
from hf_feature_smoothing.booster import GSBLoss, GSBTrainer, booster_layers
from hf_feature_smoothing.booster.data import GSBCollator, RandomCropFlip, load_image
from hf_feature_smoothing.testing_utils import (
    IMAGE_TOKEN_ID,
    VISION_END_ID,
    VISION_START_ID,
    tiny_model,
    tiny_smoothed_model,
)

from .gsb_train_script import dataset, train


PROMPT, ANSWER = [5, 6, 7], [8, 9, 10]


def _rows(family: str, num: int = 4) -> datasets.Dataset:
    """Pre-tokenised rows: BOS, the image placeholders for a 56 px image, a prompt and an answer (the labels)."""
    if family == "llava":
        image_tokens = [IMAGE_TOKEN_ID] * 16  # (56 / 14)², CLS dropped
    else:
        image_tokens = [VISION_START_ID, *[IMAGE_TOKEN_ID] * 4, VISION_END_ID]  # 4×4 patches, 2×2 merged
    ids = [1, *image_tokens, *PROMPT, *ANSWER]
    row = {"input_ids": ids, "labels": [-100] * (len(ids) - len(ANSWER)) + ANSWER}
    if family != "llava":
        row["mm_token_type_ids"] = [int(i == IMAGE_TOKEN_ID) for i in ids]
    images = dataset(num)["image"]
    return datasets.Dataset.from_list([{**row, "image": image} for image in images])


def _args(tmp_path, steps: int, **kw) -> TrainingArguments:
    kw = {"save_strategy": "no", "per_device_train_batch_size": 4, "learning_rate": 3e-3, **kw}
    return TrainingArguments(str(tmp_path / "run"), max_steps=steps, use_cpu=True, report_to=[], seed=0,
                             logging_steps=1, disable_tqdm=True, **kw)


def _history(trainer, key: str) -> list[float]:
    return [h[key] for h in trainer.state.log_history if key in h]


@pytest.mark.parametrize("family", ["llava", "qwen2_vl"])
def test_lm_term_gradients_flow_through_the_frozen_lm_into_the_booster_only(family):
    model = tiny_smoothed_model(family)
    booster = hfs.add_booster(model, GSBConfig(purifier=True, mapper_mixing="attention"))
    for param in model.parameters():  # even with every weight trainable, the LM term must not need their gradients
        param.requires_grad_(True)
    loss = GSBLoss(booster, [0.25], 1, 0.0, 0.0, FeatureSmoothingConfig(), lambda_pixel=0.0, lambda_lm=1.0,
                   lambda_consistency=0.0)
    batch = GSBCollator(loss.tower.family, 56)(list(_rows(family)))
    value = loss(**batch)
    assert value.item() == pytest.approx(loss.last_terms["lm_kl"]) and value.item() > 0
    value.backward()
    booster_grads = {n: p.grad for n, p in booster.named_parameters() if "fs_booster_" in n}
    assert all(g is not None for g in booster_grads.values())
    for part in ("fs_booster_mapper", "fs_booster_purifier"):  # both parts get a signal through projector + LM
        assert any(g.abs().sum() > 0 for n, g in booster_grads.items() if part in n), part
    lm = [n for n, p in booster.named_parameters() if "language_model" in n and p.grad is not None]
    assert lm  # the LM is really in the loop: with trainable weights it would get gradients too ...
    model.requires_grad_(False)
    hfs.add_booster  # ... which GSBTrainer forbids: see the next test


def test_lm_term_decreases_and_nothing_but_the_booster_changes(tmp_path):
    model = tiny_smoothed_model("llava")
    frozen = {k: v.clone() for k, v in model.state_dict().items()}
    booster = hfs.add_booster(model, GSBConfig(sigmas=[0.5], mapper_mixing="attention"))
    trainer = GSBTrainer(booster, _args(tmp_path, 16), train_dataset=_rows("llava", 8), image_size=56,
                         noise_samples=1, lambda_consistency=0.0, lambda_clean=0.0, lambda_stats=0.0, lambda_lm=1.0,
                         crop_scale=None, flip=False)
    trainer.train()
    kl = _history(trainer, "gsb_lm_kl")
    assert len(kl) == 16 and np.mean(kl[-4:]) < 0.7 * np.mean(kl[:4]), kl
    after = {k.replace("base_layer.", ""): v for k, v in model.state_dict().items() if "fs_booster_" not in k}
    assert after.keys() == frozen.keys() and all(torch.equal(frozen[k], after[k]) for k in frozen)


def _tiny_llava_processor():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import CLIPImageProcessor, LlavaProcessor, PreTrainedTokenizerFast

    words = ["USER:", "ASSISTANT:", "what", "is", "this", "a", "cat", "dog"]
    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3, **{w: 10 + i for i, w in enumerate(words)},
             "<image>": IMAGE_TOKEN_ID}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>",
                                        eos_token="</s>", unk_token="<unk>", additional_special_tokens=["<image>"])
    image_processor = CLIPImageProcessor(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56})
    return LlavaProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=14,
                          vision_feature_select_strategy="default", image_token="<image>", num_additional_image_tokens=1)


def test_prompt_answer_rows_with_a_processor_on_a_stock_llava(tmp_path):
    processor = _tiny_llava_processor()
    rows = datasets.Dataset.from_list([
        {"image": image, "prompt": "USER: <image> what is this ASSISTANT:", "answer": " a cat </s>"}
        for image in dataset(4)["image"]])
    booster = hfs.add_booster(tiny_model("llava"), GSBConfig(purifier=True))
    trainer = GSBTrainer(booster, _args(tmp_path, 2), train_dataset=rows, processing_class=processor, lambda_lm=1.0)
    batch = trainer.data_collator(list(rows))
    ids, labels = batch["input_ids"], batch["labels"]
    assert (ids == IMAGE_TOKEN_ID).sum(-1).tolist() == [16] * 4 and batch["pixel_values"].shape == (4, 3, 56, 56)
    answer = processor.tokenizer("a cat </s>", add_special_tokens=False)["input_ids"]
    assert all(row[row != -100].tolist() == answer for row in labels)
    assert trainer.compute_loss_context_manager and trainer.train().training_loss > 0
    assert _history(trainer, "gsb_lm_kl") and "gsb_pixel" in trainer.state.log_history[0]


def test_lm_term_needs_text_rows(tmp_path):
    booster = hfs.add_booster(tiny_smoothed_model("llava"))
    trainer = GSBTrainer(booster, _args(tmp_path, 1), train_dataset=dataset(4), image_size=56, lambda_lm=1.0)
    with pytest.raises(ValueError, match="`lambda_lm` > 0 needs text"):
        trainer.train()


def test_images_load_from_any_column_format(tmp_path):
    array = (np.arange(20 * 30 * 3) % 251).astype(np.uint8).reshape(20, 30, 3)
    image = Image.fromarray(array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    image.save(tmp_path / "x.png")
    for value in (image, array, torch.from_numpy(array), array / 255.0, str(tmp_path / "x.png"),
                  {"bytes": buffer.getvalue(), "path": None}, {"bytes": None, "path": str(tmp_path / "x.png")}):
        assert np.array_equal(np.asarray(load_image(value)), array), type(value)
    with pytest.raises(TypeError, match="Column `pic` holds int"):
        load_image(3, "pic")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]"):
        load_image(array * 2.0)


def test_training_images_are_decoded_like_run_images(tmp_path):
    """The trainer's data path uses the run sources' decoder: EXIF orientation applied and 16-bit values scaled
    (the old `convert("RGB")` ignored the orientation and clipped every 16-bit value above 255 to white)."""
    from hf_feature_smoothing.runs import FolderImages

    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray((np.arange(10 * 20 * 3) % 251).astype(np.uint8).reshape(10, 20, 3)).save(
        tmp_path / "a_rotated.jpg", exif=exif)
    values = np.random.default_rng(0).integers(55_000, 65_536, (20, 30)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "b_gray16.png")
    expected16 = np.rint(values / 65535 * 255).astype(np.uint8)
    rotated, gray16 = (str(tmp_path / name) for name in ("a_rotated.jpg", "b_gray16.png"))
    for value in (rotated, {"bytes": Path(rotated).read_bytes(), "path": None}, Image.open(rotated)):
        assert load_image(value).size == (10, 20), type(value)  # stored 20 wide, displayed 10 wide
    for value in (gray16, {"bytes": None, "path": gray16}, Image.open(gray16)):
        assert (np.asarray(load_image(value)) == expected16[..., None]).all(), type(value)
    run_images = [item.load() for item in FolderImages(tmp_path).items()]
    adapter = tiny_smoothed_model("llava").smoothed_vision_tower.family
    batch = GSBCollator(adapter, 28)([{"image": rotated}, {"image": gray16}])
    assert torch.equal(batch["pixel_values"], adapter.preprocess(run_images, 28).pixel_values)
    with Image.open(gray16) as image:  # a 16-bit PIL image given to the tower is scaled, not clipped, too
        assert torch.equal(adapter.preprocess([image], 28).pixel_values, adapter.preprocess(run_images[1:], 28).pixel_values)


def test_augmentation_is_seeded_per_image_and_epoch():
    images = dataset(6)["image"]
    augment = RandomCropFlip(seed=0)
    first = [np.asarray(augment(img, epoch=0)) for img in images]
    assert all(np.array_equal(a, np.asarray(augment(img, epoch=0))) for a, img in zip(first, images))
    assert all(np.array_equal(a, np.asarray(RandomCropFlip(seed=0)(img, epoch=0))) for a, img in zip(first, images))
    assert any(not np.array_equal(a, np.asarray(augment(img, epoch=1))) for a, img in zip(first, images))
    assert any(not np.array_equal(a, np.asarray(RandomCropFlip(seed=1)(img, 0))) for a, img in zip(first, images))
    assert len({a.shape for a in first}) > 1  # random crop sizes
    with pytest.raises(ValueError, match="`crop_scale`"):
        RandomCropFlip(0, crop_scale=(0.5, 1.5))


def test_trainer_sets_the_epoch_of_its_collator(tmp_path):
    booster = hfs.add_booster(tiny_smoothed_model("llava"))
    trainer = GSBTrainer(booster, _args(tmp_path, 3, per_device_train_batch_size=8), train_dataset=dataset(8),
                         image_size=56)
    epochs = []
    collate = trainer.data_collator.__call__
    trainer.data_collator.__class__ = type("Spy", (GSBCollator,), {"__call__": lambda self, rows: (
        epochs.append(self.epoch), collate(rows))[1]})
    trainer.train()
    assert epochs == [0, 1, 2]


def test_purifier_pretraining_skips_the_tower_and_denoises(tmp_path):
    model = tiny_smoothed_model("llava")
    booster = hfs.add_booster(model, GSBConfig(sigmas=[0.25], purifier=True, mapper_mixing="conv"))
    tower_calls = []
    model.model.vision_tower.register_forward_pre_hook(lambda m, a: tower_calls.append(1))
    mapper = {k: v.clone() for k, v in model.state_dict().items() if "fs_booster_mapper" in k}
    trainer = GSBTrainer(booster, _args(tmp_path, 12), train_dataset=dataset(8), image_size=56,
                         lambda_consistency=0.0, lambda_clean=0.0, lambda_stats=0.0, trainable=("purifier",))
    trainer.train()
    pixel = _history(trainer, "gsb_pixel")
    assert not tower_calls and pixel[0] == pytest.approx(0.25**2, rel=0.05) and np.mean(pixel[-3:]) < 0.75 * pixel[0]
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in mapper.items())  # frozen part untouched


def test_trainable_parts_are_checked(tmp_path):
    booster = hfs.add_booster(tiny_smoothed_model("llava"), GSBConfig(purifier=True))
    with pytest.raises(ValueError, match="`trainable` must name booster parts"):
        GSBTrainer(booster, _args(tmp_path, 1), train_dataset=dataset(4), trainable=("lora",))
    trainer = GSBTrainer(booster, _args(tmp_path, 1), train_dataset=dataset(4), image_size=56, trainable=("mapper",))
    purifier = next(p for n, p in booster.named_parameters() if "fs_booster_purifier" in n)
    assert not purifier.requires_grad
    purifier.requires_grad_(True)  # a frozen part that leaks into the optimisation is caught
    with pytest.raises(RuntimeError, match="trainable parts"):
        trainer.train()


def test_loss_without_a_term_for_this_booster_fails_clearly(tmp_path):
    booster = hfs.add_booster(tiny_smoothed_model("llava"))  # no purifier: the pixel term has nothing to train
    trainer = GSBTrainer(booster, _args(tmp_path, 1), train_dataset=dataset(4), image_size=56,
                         lambda_consistency=0.0, lambda_clean=0.0, lambda_stats=0.0)
    with pytest.raises(ValueError, match="No term of the loss reaches"):
        trainer.train()


def _adapter(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "adapter_model.safetensors")


def test_two_processes_train_the_booster_of_one_process_with_the_same_global_batch(tmp_path):
    """DDP over gloo on CPU. accelerate 1.15's `launch --cpu --num_processes 2` starts a single process unless an MPI
    hostfile is given; `--multi_gpu` on a machine without visible GPUs starts 2 torchrun processes on the CPU."""
    script = Path(__file__).with_name("gsb_train_script.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": os.pathsep.join(
        [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")])}
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
              "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no", str(script),
              str(tmp_path / "ddp"), "2"]
    result = subprocess.run(launch, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("'gsb_sigma'") == 3  # 3 logged steps: one run over both processes, not two runs
    train(str(tmp_path / "single"), per_device_batch=4)
    train(str(tmp_path / "other-seed"), per_device_batch=4, seed=1)
    ddp, single, other = (_adapter(tmp_path / d) for d in ("ddp", "single", "other-seed"))
    initial = hfs.add_booster(tiny_smoothed_model("llava"), hfs.GSBConfig(
        hidden_dim=32, mapper_mixing="attention", purifier={"width": 8, "depth": 3}))
    start = {k.replace(".default.", ".").removeprefix("base_model.model."): v
             for k, v in initial.state_dict().items() if "fs_booster_" in k}
    assert ddp.keys() == single.keys()
    keys = sorted(ddp)
    moved = max((single[k] - start[k.removeprefix("base_model.model.")]).abs().max().item() for k in keys)
    gap = max((ddp[k] - single[k]).abs().max().item() for k in keys)
    control = max((other[k] - single[k]).abs().max().item() for k in keys)
    # 3 Adam steps of lr 1e-3 move weights by ~3e-3; DDP averages the two shards' per-image means, which equals the
    # global per-image mean up to float summation order (~1e-7 relative), so the two runs agree to far below a step,
    # while different σ / noise / crops (another seed) differ by a sizeable fraction of one
    assert moved > 1e-3 and gap < 1e-5 and control > 1e-4, (moved, gap, control)


def test_training_noise_lives_in_the_smoothed_model_pixel_space(tmp_path):
    from transformers import CLIPImageProcessor

    mean, std = [0.5, 0.4, 0.3], [0.2, 0.25, 0.3]
    model = tiny_smoothed_model("llava", image_mean=mean, image_std=std)
    booster = hfs.add_booster(model, GSBConfig(sigmas=[0.25], hidden_dim=16))
    trainer = GSBTrainer(booster, _args(tmp_path, 1), train_dataset=dataset(4), image_size=56)
    loss = trainer.model  # the GSBLoss module
    assert loss.pixel_stats == (tuple(mean), tuple(std))  # the model's own, not the family default
    processor = CLIPImageProcessor(image_mean=[0.48, 0.46, 0.41], image_std=std)
    with pytest.raises(ValueError, match=r"image_mean \[0\.48.*vs the model's \[0\.5"):
        GSBTrainer(booster, _args(tmp_path, 1), train_dataset=dataset(4), image_size=56, processing_class=processor)


def test_attaching_a_booster_to_a_stock_model_does_not_warn_about_pixel_statistics(caplog):
    import logging

    logging.Logger.warning_once.cache_clear()  # transformers' `warning_once` would hide a repeat of the warning
    with caplog.at_level(logging.WARNING):
        hfs.add_booster(tiny_model("llava"), GSBConfig(sigmas=[0.25], hidden_dim=16, purifier=True,
                                                                  mapper_mixing="conv"))
    assert "image_mean" not in caplog.text


def test_training_images_are_made_on_the_smoothed_model_pixel_grid(tmp_path):
    """The collator resizes as the smoothed model's own processor settings say (here a squash to 56 × 56, no crop),
    not into a centre-cropped square: the booster trains on the pixel grid it is smoothed and certified on."""
    geometry = {"do_resize": True, "size": {"height": 56, "width": 56}, "resample": 3, "do_center_crop": False}
    model = tiny_smoothed_model("llava", image_processor=geometry)
    booster = hfs.add_booster(model, GSBConfig(sigmas=[0.25], hidden_dim=16))
    wide = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 100, 3), dtype=np.uint8))
    trainer = GSBTrainer(booster, _args(tmp_path, 1), train_dataset=dataset(4), crop_scale=None, flip=False)
    pixels = trainer.data_collator([{"image": wide}])["pixel_values"]
    family = model.smoothed_vision_tower.family
    assert torch.equal(pixels, family.preprocess([wide]).pixel_values)
    assert not torch.allclose(pixels, family.preprocess([wide], 56).pixel_values)  # not the square crop
    # a stock model's booster takes the pixel grid of `processing_class`: the processor's own pixels, bit for bit
    from transformers import CLIPImageProcessor

    processor = CLIPImageProcessor(size={"height": 56, "width": 56}, do_center_crop=False, image_mean=[0.5, 0.4, 0.3],
                                   image_std=[0.2, 0.25, 0.3])
    booster = hfs.add_booster(tiny_model("llava"), GSBConfig(sigmas=[0.25], hidden_dim=16))
    trainer = GSBTrainer(booster, _args(tmp_path, 1), train_dataset=dataset(4), processing_class=processor,
                         crop_scale=None, flip=False)
    assert torch.equal(trainer.data_collator([{"image": wide}])["pixel_values"],
                       processor(images=wide, return_tensors="pt").pixel_values)


def test_the_saved_booster_records_the_sigmas_it_was_trained_for(tmp_path, caplog):
    import logging

    model = tiny_smoothed_model("llava")
    booster = hfs.add_booster(model, GSBConfig(sigmas=[0.25], hidden_dim=16))
    trainer = GSBTrainer(booster, _args(tmp_path, 1), train_dataset=dataset(4), image_size=56, sigmas=[0.5, 1.0])
    assert trainer.model.sigmas == [0.5, 1.0] and booster.peft_config["default"].sigmas == [0.5, 1.0]
    model.smoothing_config.sigma = 0.5  # edited after the booster was attached: the saved record follows
    trainer.save_model(str(tmp_path / "out"))
    saved = PeftConfig.from_pretrained(str(tmp_path / "out"))
    assert saved.sigmas == [0.5, 1.0] and saved.smoothing["sigma"] == 0.5
    assert {layer.trained_noise_levels() for layer in booster_layers(booster)} == {(0.5, 1.0)}
    with caplog.at_level(logging.WARNING):
        GSBTrainer(booster, _args(tmp_path, 1), train_dataset=dataset(4), image_size=56,
                   smoothing={"sigma": 0.75, "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    assert "not used: {'sigma': 0.75}" in caplog.text
