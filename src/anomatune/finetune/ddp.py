"""Several processes, one fine-tuning: ``torchrun --nproc_per_node N anomatune finetune ...``.

Every process draws the same global batch from the shared seeded generator and computes
the features of its own contiguous share (so the generator, and ``--resume``, stay exact).
The backbone is wrapped in :class:`~torch.nn.parallel.DistributedDataParallel`, which
averages the gradients; each process's loss is its share of the global sums, divided by
the global counts, times the number of processes, so the averaged gradient is the one
process's gradient of the same global batch. The guide follows the good features of every
process (gathered in rank order: the same update as one process), and the outlier filter
takes its fraction of every process's negatives. Files are written by rank 0 only.

Without torchrun (``WORLD_SIZE`` unset or 1) :class:`ProcessGroup` is one process and every
operation is the identity: the single-process fine-tuning runs the same code.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
from torch import nn

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ProcessGroup:
    """The fine-tuning's processes, and this one's ``rank`` among their ``size``."""

    rank: int = 0
    size: int = 1

    @classmethod
    def from_env(cls, device: torch.device) -> ProcessGroup:
        """One process, or torchrun's ``RANK`` of ``WORLD_SIZE`` (process group: NCCL on CUDA, gloo on the CPU)."""
        size = int(os.environ.get("WORLD_SIZE", "1"))
        if size == 1:
            return cls()
        import torch.distributed as dist

        if not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
        group = cls(dist.get_rank(), dist.get_world_size())
        if not group.is_main:  # one voice: the other ranks only warn
            logging.getLogger("anomatune").setLevel(logging.WARNING)
        log.info("fine-tuning on %d processes (%s)", group.size, dist.get_backend())
        return group

    @staticmethod
    def local_device(device: torch.device) -> torch.device:
        """Under torchrun each process takes the GPU of its ``LOCAL_RANK``."""
        if device.type == "cuda" and "LOCAL_RANK" in os.environ:
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
            return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        return device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def share(self, n: int) -> slice:
        """This process's contiguous share of ``n`` items (the first ``n % size`` processes take one more)."""
        base, extra = divmod(n, self.size)
        start = self.rank * base + min(self.rank, extra)
        return slice(start, start + base + (self.rank < extra))

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The sum over processes (a detached copy)."""
        tensor = tensor.detach().clone()
        if self.size > 1:
            import torch.distributed as dist

            device = tensor.device
            if dist.get_backend() == "nccl" and device.type != "cuda":  # NCCL reduces GPU tensors only
                tensor = tensor.cuda()
            dist.all_reduce(tensor)
            tensor = tensor.to(device)
        return tensor

    def gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every process's rows, in rank order (detached; the shares may differ in length)."""
        if self.size == 1:
            return tensor.detach()
        import torch.distributed as dist

        parts: list = [None] * self.size
        dist.all_gather_object(parts, tensor.detach().cpu())
        return torch.cat(parts).to(tensor.device)

    def wrap(self, module: nn.Module) -> nn.Module:
        """``module`` under DistributedDataParallel (its gradients averaged at backward), or as it is."""
        if self.size == 1:
            return module
        from torch.nn.parallel import DistributedDataParallel

        device = next(module.parameters()).device
        return DistributedDataParallel(module, device_ids=[device] if device.type == "cuda" else None, broadcast_buffers=False)

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


class StageFeatures(nn.Module):
    """The extractor's stage features as a module's forward: what DistributedDataParallel wraps."""

    def __init__(self, extractor: nn.Module):
        super().__init__()
        self.extractor = extractor

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.extractor.stage_features(images)
