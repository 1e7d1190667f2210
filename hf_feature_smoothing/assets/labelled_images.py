"""Real labelled images that install offline, as visual question answering examples: scikit-learn's handwritten
digits (1797 images, 10 classes) and the `conformal-clip-data` textiles (2000 images: nominal, local or global
defect). Splits are fixed (no shuffling), so train and held-out images never overlap."""

from dataclasses import dataclass

import numpy as np

from ..utils.images import decode
from .real_data import _package_dir


DIGIT_QUESTION = "Which digit is this?"
TEXTILE_QUESTION = "Is this textile nominal or defective, and how?"
TEXTILE_CLASSES = ("nominal", "local", "global")
# answers are sentences: the frozen LM's own prior then fixes the format, and the image decides the class word
TEXTILE_ANSWERS = ("The textile is nominal.", "The textile has a local defect.", "The textile has a global defect.")
DIGITS_TRAIN = 1400  # the first 1400 digits train; the other 397 are held out
TEXTILES_TRAIN, TEXTILES_TEST = 200, 100  # per class: the first 200 files train, the next 100 are held out
SPLITS = ("train", "test")


@dataclass
class VQAExample:
    """One image with a question, its reference answer and its class index."""

    key: str
    image: object  # PIL.Image.Image
    question: str
    answer: str
    label: int
    task: str


def digit_answer(digit: int) -> str:
    return f"The digit is {digit}."


# the built-in candidate sets of `hf-fs certify-answer --candidates`: name -> (question, answers in class order)
ANSWER_SETS = {
    "digits": (DIGIT_QUESTION, tuple(digit_answer(k) for k in range(10))),
    "textiles": (TEXTILE_QUESTION, TEXTILE_ANSWERS),
}


def render_digit(pixels: np.ndarray, size: int = 112):
    """An 8×8 scikit-learn digit (ink 0–16) as a dark-on-white RGB PIL image upscaled (bicubic) to `size`."""
    from PIL import Image

    gray = (255 - np.asarray(pixels, dtype=np.float64) / 16.0 * 255).round().clip(0, 255).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB").resize((size, size), Image.Resampling.BICUBIC)


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {SPLITS}, got {split!r}.")


def digit_examples(split: str = "test", size: int = 112, limit: int | None = None) -> list[VQAExample]:
    """Handwritten digits as VQA examples ("Which digit is this?" → "The digit is 7.")."""
    from sklearn.datasets import load_digits

    _check_split(split)
    digits = load_digits()
    indices = range(DIGITS_TRAIN) if split == "train" else range(DIGITS_TRAIN, len(digits.target))
    indices = list(indices)[:limit]
    return [VQAExample(key=f"digits/{i}", image=render_digit(digits.images[i], size), question=DIGIT_QUESTION,
                       answer=digit_answer(int(digits.target[i])), label=int(digits.target[i]), task="digits")
            for i in indices]


def textile_examples(split: str = "test", limit_per_class: int | None = None) -> list[VQAExample]:
    """Textile images (250×250) as VQA examples ("Is this textile nominal or defective, and how?")."""
    _check_split(split)
    root = next(_package_dir("conformal_clip_data").rglob("simulated"))
    start, stop = (0, TEXTILES_TRAIN) if split == "train" else (TEXTILES_TRAIN, TEXTILES_TRAIN + TEXTILES_TEST)
    if limit_per_class is not None:
        stop = min(stop, start + limit_per_class)
    examples = []
    for label, name in enumerate(TEXTILE_CLASSES):
        for file in sorted((root / name).iterdir())[start:stop]:
            examples.append(VQAExample(key=f"textiles/{name}/{file.name}", image=decode(lambda f=file: f),
                                       question=TEXTILE_QUESTION, answer=TEXTILE_ANSWERS[label], label=label,
                                       task="textiles"))
    return examples
