"""Image sources for dataset-scale runs, read lazily: one image is decoded at a time and its file is closed
before the next one is opened, so memory and open files stay constant in the number of images. An image that
cannot be read becomes an [`UnreadableImage`] (recorded as a `skipped` row), never the end of the run."""

import json
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

from ..utils.errors import RunError
from ..utils.images import UnreadableImage, decode, encoded_image, to_rgb
from ..utils.logging import get_logger


logger = get_logger(__name__)
IMAGE_SUFFIXES = (".apng", ".avif", ".bmp", ".dib", ".gif", ".ico", ".j2k", ".jfif", ".jp2", ".jpe", ".jpeg", ".jpg",
                  ".pbm", ".pgm", ".png", ".pnm", ".ppm", ".tga", ".tif", ".tiff", ".webp")


@dataclass
class ImageItem:
    """One image of a source: its position `index` in the source, its `key` (path relative to the folder, or
    `split/row`), its label (datasets) and `load()`, which decodes it (raising [`UnreadableImage`])."""

    index: int
    key: str
    label: int | None
    load: Callable[[], object]


class ImageSource(ABC):
    """A sequence of images addressed by position; nothing is decoded until an item's `load()`."""

    #: what identifies the source in the run parameters
    description: dict

    @abstractmethod
    def __len__(self) -> int: ...

    @abstractmethod
    def item(self, index: int) -> ImageItem: ...

    def items(self, indices: range | None = None) -> Iterator[ImageItem]:
        for index in indices if indices is not None else range(len(self)):
            yield self.item(index)


def printable_name(name: str) -> str:
    """`name` (a path from the OS, undecodable bytes as surrogates) as valid UTF-8 text: bytes that are not UTF-8
    become `\\xNN` escapes (`caf\\xe9.png`), so run files, JSON and logs can hold every file name."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


class FolderImages(ImageSource):
    """Image files under `folder` (recursively, common suffixes, hidden files and folders left out), sorted by
    their path relative to the folder, which is their key. Only the file names are listed up front. A file name
    that is not valid UTF-8 is kept: its key is [`printable_name`] (`\\xNN` escapes, logged once), the file is
    read by its real name.

    Args:
        folder (`str` or `os.PathLike`):
            The folder; one without image files is an error ([`RunError`]).
        max_pixels (`int`, *optional*):
            Images with more pixels are unreadable (decompression bombs); `None`: no limit.
    """

    def __init__(self, folder: str | os.PathLike, max_pixels: int | None = None):
        self.folder = Path(folder)
        if not self.folder.is_dir():
            raise RunError(f"--images {printable_name(str(folder))}: not a folder (pass a folder of images, or "
                           f"`skimage`).")
        self.max_pixels = max_pixels
        files, ignored = {}, 0  # key -> path relative to the folder
        for root, dirs, names in os.walk(self.folder):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if name.startswith(".") or Path(name).suffix.lower() not in IMAGE_SUFFIXES:
                    ignored += 1
                    continue
                relative = (Path(root) / name).relative_to(self.folder).as_posix()
                key = printable_name(relative)
                if key != relative:
                    logger.warning(f"--images {printable_name(str(folder))}: the file name {key} is not valid UTF-8; "
                                   f"it is kept, with this key (\\xNN: the bytes that are not UTF-8).")
                if key in files:  # only when another file is literally named with the escapes
                    logger.warning(f"--images: {key} names two files; the second one ({relative!r}) is left out.")
                    ignored += 1
                    continue
                files[key] = relative
        if not files:
            raise RunError(f"--images {folder}: no image files found (looked for {', '.join(IMAGE_SUFFIXES)}; "
                           f"{ignored} other files).")
        if ignored:
            logger.info(f"--images {folder}: {len(files)} images; {ignored} other or hidden files left out.")
        self.files = sorted(files)
        self._paths = files
        self.description = {"kind": "folder", "path": printable_name(str(self.folder.resolve()))}

    def __len__(self) -> int:
        return len(self.files)

    def item(self, index: int) -> ImageItem:
        path = self.folder / self._paths[self.files[index]]
        return ImageItem(index, self.files[index], None, lambda: decode(lambda: path, self.max_pixels))


class SkimageImages(ImageSource):
    """The scikit-image photos shipped with the package's test extras (`--images skimage`)."""

    NAMES = ("astronaut", "chelsea", "coffee", "rocket", "cat", "hubble_deep_field", "immunohistochemistry",
             "retina", "colorwheel", "logo")

    def __init__(self):
        self.description = {"kind": "skimage", "names": list(self.NAMES)}

    def __len__(self) -> int:
        return len(self.NAMES)

    def item(self, index: int) -> ImageItem:
        def load():
            from ..assets import skimage_photos

            return to_rgb(skimage_photos((self.NAMES[index],))[self.NAMES[index]])

        return ImageItem(index, self.NAMES[index], None, load)


class FirstImages(ImageSource):
    """The first `limit` images of another source (`--limit`: smoke runs and subsets)."""

    def __init__(self, source: ImageSource, limit: int):
        self.source, self.limit = source, limit
        self.description = {**source.description, "limit": limit}
        for name in ("num_classes", "label_column"):
            if hasattr(source, name):
                setattr(self, name, getattr(source, name))

    def __len__(self) -> int:
        return min(self.limit, len(self.source))

    def item(self, index: int) -> ImageItem:
        return self.source.item(index)


class LabelledImages(ImageSource):
    """The labelled images shipped with the package's extras, with their class labels: `--images digits:test`
    (scikit-learn digits, 10 classes), `--images textiles:train` (conformal-clip-data textiles, 3 classes)."""

    NAMES = ("digits", "textiles")

    def __init__(self, spec: str):
        from ..assets.labelled_images import SPLITS, digit_examples, textile_examples

        name, _, split = spec.partition(":")
        if name not in self.NAMES or split not in SPLITS:
            raise RunError(f"--images {spec}: built-in labelled sets are {[f'{n}:{s}' for n in self.NAMES for s in SPLITS]}.")
        self.num_classes = 10 if name == "digits" else 3
        self.label_column = "label"
        self.description = {"kind": "labelled", "name": name, "split": split}
        if name == "digits":  # scikit-learn's order already mixes the classes
            self.examples = digit_examples(split)
        else:  # stored class by class: interleave them so that `--limit N` takes a class-balanced subset
            by_class = [[e for e in textile_examples(split) if e.label == k] for k in range(self.num_classes)]
            self.examples = [e for group in zip_longest(*by_class) for e in group if e is not None]
            self.description["order"] = "classes interleaved"
        self.description["count"] = len(self.examples)

    def __len__(self) -> int:
        return len(self.examples)

    def item(self, index: int) -> ImageItem:
        example = self.examples[index]
        return ImageItem(index, example.key, example.label, lambda: to_rgb(example.image))


def _load_from_disk(path: Path, name: str, split: str):
    """`datasets.load_from_disk`, its failures as a [`RunError`] naming the folder; a split saved without any data
    file (an empty split, which `datasets` cannot read back) is reported as empty."""
    import datasets

    try:
        return datasets.load_from_disk(str(path))
    except Exception as error:  # noqa: BLE001  (datasets raises many types for unreadable folders)
        for state in [path / "state.json", path / split / "state.json"]:
            try:
                if state.is_file() and not json.loads(state.read_text()).get("_data_files"):
                    raise RunError(f"--dataset {name} --split {split}: the split is empty (saved without any "
                                   f"row); pass a split with images.") from None
            except (OSError, ValueError):
                pass
        raise RunError(f"--dataset {name}: not readable by `datasets.load_from_disk` ({type(error).__name__}: "
                       f"{error}); save it again with `Dataset.save_to_disk`.") from None


def _open_dataset(name: str, split: str):
    """A `save_to_disk` folder, a local `load_dataset`-able folder, or a Hub dataset id (offline cache) → (the
    split as a memory-mapped `datasets.Dataset`, its description)."""
    import datasets

    path = Path(name)
    if path.exists():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            data = _load_from_disk(path, name, split)
            kind = "save_to_disk"
            if isinstance(data, datasets.DatasetDict):
                if split not in data:
                    raise RunError(f"--split {split}: {name} has splits {sorted(data)}.")
                data = data[split]
        else:
            data, kind = None, "folder"
        description = {"kind": kind, "path": str(path.resolve()), "split": split}
    else:
        from huggingface_hub import snapshot_download

        try:
            path = Path(snapshot_download(name, repo_type="dataset"))  # works offline from the Hub cache
        except Exception as error:  # noqa: BLE001
            raise RunError(f"--dataset {name}: not a local folder, and the Hub dataset could not be fetched "
                           f"({type(error).__name__}: {error}).") from None
        data, kind = None, "hub"
        description = {"kind": kind, "name": name, "revision": path.name, "split": split}
    if data is None:
        try:
            data = datasets.load_dataset(str(path), split=split)
        except ValueError as error:
            raise RunError(f"--dataset {name} --split {split}: {error}") from None
    return data, description


class DatasetImages(ImageSource):
    """Rows of a 🤗 dataset split, read one at a time from its memory-mapped Arrow table; the image column is read
    undecoded (bytes or path) and decoded here, so a broken cell becomes a skipped row. Keys are `split/row`.

    Args:
        name (`str`):
            A `save_to_disk` folder, a folder `datasets.load_dataset` reads, or a Hub dataset id (offline cache).
        split (`str`, *optional*, defaults to `"train"`):
            The split to read (ignored by a `save_to_disk` folder holding a single `Dataset`).
        image_column (`str`, *optional*, defaults to `"image"`):
            Column of images (an `Image` feature, bytes, or paths).
        label_column (`str`, *optional*, defaults to `"label"`):
            Column of integer labels, or `None`.
        max_pixels (`int`, *optional*):
            As for [`FolderImages`].
        label_required (`bool`, *optional*, defaults to `True`):
            When `False`, a missing `label_column` means no labels instead of an error.
    """

    def __init__(self, name: str, split: str = "train", image_column: str = "image",
                 label_column: str | None = "label", max_pixels: int | None = None, label_required: bool = True):
        import datasets

        data, description = _open_dataset(name, split)
        if image_column not in data.column_names:
            raise RunError(f"--image-column {image_column}: not a column of {name} (columns: {data.column_names}).")
        if label_column is not None and label_column not in data.column_names and not label_required:
            label_column = None
        if label_column is not None and label_column not in data.column_names:
            raise RunError(f"--label-column {label_column}: not a column of {name} (columns: {data.column_names}).")
        if len(data) == 0:
            raise RunError(f"--dataset {name} --split {split}: the split is empty.")
        if isinstance(data.features[image_column], datasets.Image):
            data = data.cast_column(image_column, datasets.Image(decode=False))
        self.data, self.split, self.max_pixels = data, split, max_pixels
        self._labels = data.select_columns([label_column]) if label_column else None  # labels without image bytes
        self.image_column, self.label_column = image_column, label_column
        feature = data.features.get(label_column) if label_column else None
        self.num_classes = getattr(feature, "num_classes", None)
        self.description = {**description, "image_column": image_column, "label_column": label_column}

    def __len__(self) -> int:
        return len(self.data)

    def _opener(self, cell) -> Callable[[], object]:
        opener = encoded_image(cell)
        if opener is None:
            raise UnreadableImage(f"column {self.image_column!r} holds {type(cell).__name__}, not an image")
        return opener

    def item(self, index: int) -> ImageItem:
        def load():
            from PIL import Image

            cell = self.data[index][self.image_column]
            if isinstance(cell, Image.Image):
                return to_rgb(cell)
            return decode(self._opener(cell), self.max_pixels)

        label = self._labels[index][self.label_column] if self._labels is not None else None
        return ImageItem(index, f"{self.split}/{index}", label, load)
