"""Dataset-scale runs you can trust: run files that carry their parameters (`records`), exclusive locks
(`locking`), lazily read image sources (`images`), resumable sharded runs under 🤗 Accelerate (`runner`,
`sharding`), and reports from finished runs (`report`, `plotting`)."""

from .errors import RunError
from .images import (
    DatasetImages,
    FirstImages,
    FolderImages,
    ImageItem,
    ImageSource,
    LabelledImages,
    SkimageImages,
    UnreadableImage,
)
from .records import RunContents, load_run, read_run
from .runner import Run
from .sharding import Shard


__all__ = [
    "DatasetImages",
    "FirstImages",
    "FolderImages",
    "ImageItem",
    "ImageSource",
    "LabelledImages",
    "Run",
    "RunContents",
    "RunError",
    "Shard",
    "SkimageImages",
    "UnreadableImage",
    "load_run",
    "read_run",
]
