"""Scale-out with 🤗 Accelerate: under `accelerate launch`, process r of w handles images r, r + w, r + 2w, ... of
the source and writes its own resumable shard file; rank 0 merges the shards into the output in source order."""

import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch


def _use_cpu(device: str | None) -> bool:
    if device is not None:
        return torch.device(device).type == "cpu"
    if os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return not (torch.cuda.is_available() or (hasattr(torch, "xpu") and torch.xpu.is_available()))


@dataclass
class Shard:
    """This process's place in the run: `rank` of `world` processes (0 of 1 without `accelerate launch`). Without
    an accelerate state (`Shard(rank, world)` built by hand), barriers and broadcasts do nothing: ranks can then be
    played one after the other in one process (tests, or re-running one rank of a big job)."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")
    _state: object = None

    @classmethod
    def from_accelerate(cls, device: str | None = None) -> "Shard":
        """The `accelerate.PartialState` of this process (initialising torch.distributed when launched with
        `accelerate launch` / `torchrun`). `device` (e.g. `"cpu"`) overrides accelerate's device for this rank."""
        from accelerate import PartialState

        state = PartialState(cpu=_use_cpu(device))
        return cls(state.process_index, state.num_processes, torch.device(device) if device else state.device, state)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def indices(self, count: int) -> range:
        """Source positions this process handles."""
        return range(self.rank, count, self.world)

    def barrier(self) -> None:
        if self.world > 1 and self._state is not None:
            self._state.wait_for_everyone()

    def broadcast(self, value):
        """Rank 0's `value` on every rank (any picklable object)."""
        if self.world == 1 or self._state is None:
            return value
        from accelerate.utils import broadcast_object_list

        box = [value]
        broadcast_object_list(box, from_process=0)
        return box[0]


def shard_path(output: str | os.PathLike, rank: int, world: int) -> Path:
    """`<stem>.rank{r}-of-{w}<suffix>` next to the output, e.g. `cert.rank0-of-8.jsonl`."""
    output = Path(output)
    return output.with_name(f"{output.stem}.rank{rank}-of-{world}{output.suffix}")


def existing_shards(output: str | os.PathLike) -> list[Path]:
    """Shard files of `output` left on disk (by a run that was stopped, with any number of processes)."""
    output = Path(output)
    pattern = re.compile(rf"{re.escape(output.stem)}\.rank\d+-of-\d+{re.escape(output.suffix)}")
    if not output.parent.is_dir():
        return []
    return sorted(p for p in output.parent.iterdir() if pattern.fullmatch(p.name))
