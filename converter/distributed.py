"""torchrun launches: which process this is, and rank 0 handing the compressed model to the rest.

Under torchrun every process runs the same `rankfold compress`, but only the fine-tuning needs
them all. Rank 0 alone traces, plans, decomposes, refits and recalibrates, then hands the model
to the other ranks (`Handoff`); after the fine-tuning it alone exports, validates, times and
writes --out. The other ranks print nothing (`ui.console` is quiet there): one run, one log.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from rankfold.passes.core import RankfoldError

# The other ranks wait through rank 0's decomposition, refit and recalibration, which take
# minutes to hours on ImageNet-size models, far beyond a collective's default timeout. Only the
# handoff waits that long; the training collectives keep torch's default.
HANDOFF_TIMEOUT = timedelta(hours=24)


def launch_rank() -> tuple[int, int]:
    """(rank, world size) of this process in a torchrun launch; (0, 1) outside one."""
    return int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))


def init_distributed(device: torch.device) -> tuple[int, int, bool]:
    """(rank, world size, whether we created the process group) from torchrun's environment."""
    if launch_rank()[1] <= 1:
        return 0, 1, False
    created = False
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        created = True
    return dist.get_rank(), dist.get_world_size(), created


@dataclass
class Handoff:
    """The process group of a torchrun launch that fine-tunes, and the channel on which rank 0
    sends the model it compressed to the other ranks. A context manager: leaving it leaves the
    process group."""

    rank: int
    created: bool
    group: Any  # a gloo group with HANDOFF_TIMEOUT: objects travel on the CPU whatever the device
    sent: bool = False

    @classmethod
    def start(cls, device: torch.device) -> Handoff:
        """Join the process group of the torchrun launch this process is part of."""
        rank, _, created = init_distributed(device)
        return cls(rank, created, dist.new_group(backend="gloo", timeout=HANDOFF_TIMEOUT))

    def send(self, payload: dict[str, Any]) -> None:
        """Rank 0: give every rank `payload` (plan, state dict, reports)."""
        dist.broadcast_object_list([("model", payload)], src=0, group=self.group)
        self.sent = True

    def receive(self) -> dict[str, Any]:
        """The other ranks: wait for rank 0's `send`; rank 0's failure before it is raised here."""
        box: list[Any] = [None]
        dist.broadcast_object_list(box, src=0, group=self.group)
        kind, value = box[0]
        if kind == "error":
            raise RankfoldError(f"rank 0 stopped before fine-tuning: {value}")
        return value

    @contextlib.contextmanager
    def leading(self) -> Iterator[None]:
        """Rank 0's work up to `send`: should it fail first, the other ranks hear why and stop,
        instead of waiting HANDOFF_TIMEOUT for a model that never comes."""
        try:
            yield
        except BaseException as exc:
            if not self.sent:
                reason = (str(exc).splitlines() or [""])[0] or type(exc).__name__
                dist.broadcast_object_list([("error", reason)], src=0, group=self.group)
            raise

    def __enter__(self) -> Handoff:
        return self

    def __exit__(self, *exc_info: object) -> None:
        # The caller's own process group stays; ours goes, and the handoff's with it.
        dist.destroy_process_group(None if self.created else self.group)
