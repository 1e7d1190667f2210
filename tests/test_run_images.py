"""Lazy image sources: unreadable files become skipped rows, high bit depth is scaled, EXIF applied, all common
suffixes, empty input refused, open files constant (2000 files under a 64-descriptor limit), datasets."""

import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib

import numpy as np
import pytest
from PIL import Image

from hf_feature_smoothing.cli import main
from hf_feature_smoothing.runs import FolderImages, RunError, UnreadableImage, read_run
from hf_feature_smoothing.runs.images import to_rgb

from .conftest import populate_hub_cache


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _png(width: int, height: int, bit_depth: int, color_type: int, raw: bytes) -> bytes:
    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + _chunk(b"IDAT", zlib.compress(raw))
            + _chunk(b"IEND", b""))


def _random_png(path, seed: int = 0, size=(40, 50)) -> None:
    pixels = np.random.default_rng(seed).integers(0, 256, (*size, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path)


@pytest.fixture
def messy_folder(tmp_path):
    """Readable images in every common format next to each kind of unreadable file."""
    folder = tmp_path / "messy"
    (folder / "sub").mkdir(parents=True)
    _random_png(folder / "a_good.png")
    _random_png(folder / "sub" / "nested.PNG", seed=1)
    Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(folder / "b.tif")
    Image.fromarray(np.full((12, 16, 3), 90, np.uint8)).save(folder / "c.tiff")
    frames = [Image.fromarray(np.full((8, 8, 3), v, np.uint8)) for v in (10, 200)]
    frames[0].save(folder / "d.gif", save_all=True, append_images=frames[1:])
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(folder / "e.webp")
    Image.fromarray(np.full((8, 8, 3), 50, np.uint8)).save(folder / "f.bmp")
    (folder / "text.png").write_text("this is not an image")
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "dangling.png").symlink_to(folder / "missing.png")
    # a 100 000 × 100 000 image in a few hundred bytes: PIL's DecompressionBombError at open
    (folder / "bomb.png").write_bytes(_png(100_000, 100_000, 1, 0, b"\x00" * 64))
    data = (folder / "a_good.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "notes.txt").write_text("not an image suffix: left out")
    (folder / ".hidden.png").write_text("hidden: left out")
    return folder


UNREADABLE = {"text.png": "UnidentifiedImageError", "empty.jpg": "UnidentifiedImageError",
              "dangling.png": "FileNotFoundError", "bomb.png": "DecompressionBombError",
              "truncated.png": "image file is truncated"}


def test_unreadable_files_become_skipped_rows_and_the_run_goes_on(messy_folder, tmp_path):
    out = tmp_path / "run.jsonl"
    assert main(["certify", "--model", "tiny-llava", "--n", "8", "--n0", "4", "--seed", "0", "--images",
                 str(messy_folder), "--output", str(out)]) == 0
    rows = {r["key"]: r for r in read_run(out).rows}
    assert sorted(rows) == sorted(["a_good.png", "b.tif", "bomb.png", "c.tiff", "d.gif", "dangling.png", "e.webp",
                                   "empty.jpg", "f.bmp", "sub/nested.PNG", "text.png", "truncated.png"])
    for key, reason in UNREADABLE.items():
        assert rows[key]["status"] == "skipped" and reason in rows[key]["reason"], rows[key]
    assert all(rows[k]["status"] == "ok" for k in rows if k not in UNREADABLE)
    assert [r["index"] for r in read_run(out).rows] == list(range(12))  # source order, running index


def test_pixel_limit_option_skips_large_images(tmp_path):
    folder = tmp_path / "imgs"
    folder.mkdir()
    _random_png(folder / "big.png", size=(40, 50))
    _random_png(folder / "small.png", size=(8, 8))
    source = FolderImages(folder, max_pixels=1000)
    big, small = source.items()
    with pytest.raises(UnreadableImage, match="DecompressionBombError.*--max-image-pixels"):
        big.load()
    assert small.load().size == (8, 8)
    assert FolderImages(folder, max_pixels=None).item(0).load().size == (50, 40)


def test_16_bit_png_is_scaled_not_clipped(tmp_path):
    """A near-white 16-bit grey PNG: the old `convert("RGB")` clipped every value above 255 to 255."""
    values = np.random.default_rng(0).integers(55_000, 65_536, (20, 30)).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "gray16.png")
    rgb16 = np.stack([values] * 3, axis=-1).astype(">u2")
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb16)
    (tmp_path / "rgb16.png").write_bytes(_png(30, 20, 16, 2, raw))
    expected = np.rint(values / 65535 * 255).astype(np.uint8)
    with Image.open(tmp_path / "gray16.png") as image:
        assert image.mode == "I;16"
        loaded = np.asarray(to_rgb(image))
    assert (loaded[..., 0] == expected).all() and (loaded < 255).mean() > 0.5
    with Image.open(tmp_path / "rgb16.png") as image:
        assert np.abs(np.asarray(to_rgb(image))[..., 0].astype(int) - expected).max() <= 1


def test_out_of_range_float_and_signed_images_are_refused_with_a_reason(tmp_path):
    Image.fromarray(np.full((4, 4), 3.5, np.float32)).save(tmp_path / "f.tif")
    Image.fromarray(np.full((4, 4), 0.25, np.float32)).save(tmp_path / "g.tif")
    with Image.open(tmp_path / "f.tif") as image, pytest.raises(UnreadableImage, match=r"not intensities in \[0, 1\]"):
        to_rgb(image)
    with Image.open(tmp_path / "g.tif") as image:
        assert np.asarray(to_rgb(image))[0, 0, 0] == 64


def test_exif_orientation_is_applied(tmp_path):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    Image.fromarray(np.zeros((10, 20, 3), np.uint8)).save(tmp_path / "rotated.jpg", exif=exif)
    assert FolderImages(tmp_path).item(0).load().size == (10, 20)  # stored 20 wide, displayed 10 wide


def test_empty_input_is_an_error(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    assert main(["certify", "--model", "tiny-llava", "--images", str(tmp_path / "empty"), "--output",
                 str(tmp_path / "run.jsonl")]) == 2  # a bad option value, found before anything is written
    assert f"--images {tmp_path / 'empty'}: no image files found" in capsys.readouterr().err
    with pytest.raises(RunError, match="not a folder"):
        FolderImages(tmp_path / "nowhere")


def test_2000_files_under_a_64_descriptor_limit(tmp_path):
    """Every image of a 2000-file folder is read, one at a time, with at most 64 open files; then a short run of
    the whole CLI under the same limit (150 of those files: the work per image does not depend on the count)."""
    many, few = tmp_path / "many", tmp_path / "few"
    many.mkdir()
    few.mkdir()
    for i in range(2000):
        Image.fromarray(np.full((4, 4, 3), i % 256, np.uint8)).save(many / f"{i:04d}.png")
    for i in range(150):
        os.link(many / f"{i:04d}.png", few / f"{i:04d}.png")
    script = textwrap.dedent(f"""
        import os, resource, sys
        resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
        from hf_feature_smoothing.cli import main
        from hf_feature_smoothing.runs import FolderImages
        start = len(os.listdir("/proc/self/fd"))
        most = start
        for item in FolderImages({str(many)!r}).items():
            assert item.load().getpixel((0, 0))[0] == item.index % 256
            most = max(most, len(os.listdir("/proc/self/fd")))
        print("FDS", start, most)
        sys.exit(main(["certify", "--model", "tiny-llava", "--n", "2", "--n0", "1", "--seed", "0", "--images",
                       {str(few)!r}, "--output", {str(tmp_path / "run.jsonl")!r}, "--verbosity", "error"]))
    """)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    start, most = map(int, result.stdout.split("FDS")[1].split()[:2])
    assert most <= start + 1  # constant: the one image being read
    rows = read_run(tmp_path / "run.jsonl").rows
    assert len(rows) == 150 and all(r["status"] == "ok" for r in rows)


def test_dataset_save_to_disk_folder_with_labels_for_predictions(tmp_path, capsys):
    import datasets
    import torch
    from safetensors.torch import save_file

    images = [Image.fromarray(np.random.default_rng(i).integers(0, 256, (30, 30, 3), dtype=np.uint8))
              for i in range(3)]
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b", "c"])})
    datasets.Dataset.from_dict({"image": images, "label": [2, 0, 1]}, features=features).save_to_disk(tmp_path / "ds")
    save_file({"prototypes": torch.randn(3, 1024)}, tmp_path / "protos.safetensors")
    out = tmp_path / "run.jsonl"
    assert main(["certify", "--model", "tiny-llava", "--n", "8", "--n0", "4", "--seed", "0", "--dataset",
                 str(tmp_path / "ds"), "--prototypes", str(tmp_path / "protos.safetensors"), "--output",
                 str(out)]) == 0
    contents = read_run(out)
    assert contents.header["params"]["source"]["kind"] == "save_to_disk"
    assert [(r["key"], r["index"], r["label"]) for r in contents.rows] == [("train/0", 0, 2), ("train/1", 1, 0),
                                                                          ("train/2", 2, 1)]
    save_file({"prototypes": torch.randn(2, 1024)}, tmp_path / "two.safetensors")
    assert main(["certify", "--model", "tiny-llava", "--dataset", str(tmp_path / "ds"), "--prototypes",
                 str(tmp_path / "two.safetensors"), "--output", str(tmp_path / "two.jsonl")]) == 2
    assert "2 classes, but --label-column label has 3" in capsys.readouterr().err
    assert not (tmp_path / "two.jsonl").exists()  # refused before the run file is written
    # plain integer labels (no ClassLabel): an out-of-range one is refused before the run starts
    datasets.Dataset.from_dict({"image": images, "label": [1, 7, 0]}).cast_column(
        "image", datasets.Image()).save_to_disk(tmp_path / "ints")
    out = tmp_path / "ints.jsonl"
    assert main(["certify", "--model", "tiny-llava", "--n", "8", "--seed", "0", "--dataset", str(tmp_path / "ints"),
                 "--label-column", "label", "--prototypes", str(tmp_path / "protos.safetensors"), "--output",
                 str(out)]) == 2
    assert "--label-column label: row train/1 has label 7, but --prototypes has 3 classes" in capsys.readouterr().err
    assert not out.exists()
    # a label column that feature certificates would not read: refused, not recorded and ignored
    assert main(["certify", "--model", "tiny-llava", "--n", "8", "--seed", "0", "--dataset", str(tmp_path / "ints"),
                 "--label-column", "label", "--output", str(out)]) == 2
    assert "--label-column label: labels are read by prediction certificates" in capsys.readouterr().err
    assert not out.exists()


def test_dataset_from_a_local_folder_and_from_the_offline_hub_cache(tmp_path, monkeypatch):
    import datasets
    import huggingface_hub

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "datasets-cache")
    folder = tmp_path / "imagefolder"
    for label in ("cat", "dog"):
        (folder / "train" / label).mkdir(parents=True)
        for i in range(2):
            _random_png(folder / "train" / label / f"{i}.png", seed=i + 10 * len(label))
    out = tmp_path / "local.jsonl"
    assert main(["certify", "--model", "tiny-llava", "--n", "8", "--seed", "0", "--dataset", str(folder),
                 "--output", str(out)]) == 0
    local = read_run(out)
    assert local.header["params"]["source"]["kind"] == "folder" and len(local.rows) == 4

    cache = tmp_path / "hub"
    populate_hub_cache(cache, "org/pets", folder, repo_type="dataset")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    out = tmp_path / "hub.jsonl"
    assert main(["certify", "--model", "tiny-llava", "--n", "8", "--seed", "0", "--dataset", "org/pets",
                 "--output", str(out)]) == 0
    hub = read_run(out)
    assert hub.header["params"]["source"] == {"kind": "hub", "name": "org/pets", "revision": "0" * 40,
                                              "split": "train", "image_column": "image", "label_column": "label"}
    same = ("score", "score_lower", "fcsb")
    assert [[r[k] for k in same] for r in hub.rows] == [[r[k] for k in same] for r in local.rows]
    json.dumps(hub.header, allow_nan=False)
