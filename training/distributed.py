"""Training on several processes with ``torch.distributed``: ``torchrun --nproc-per-node N -m
mfserve.training train ...`` (``mfserve train --nproc N`` runs torchrun itself).

What each rank does (``mfserve.training.fit`` calls the collectives below; with one process they
are no-ops and the code is the single-process code):

* Every rank reads the ratings and encodes them (the id maps must agree), then works on its
  shard: in each global batch of the rating head, rank ``r`` takes rows ``r, r + N, ...``.
* **Rating head**: each rank computes the per-row gradients of its rows of the global batch,
  the ranks exchange them (two all-gathers a batch: the rows, and their gradients) and every
  rank applies the whole batch, so a step moves what one process would move and the
  parameters stay identical on every rank.
* **Ranking head (iALS)**: each sweep, rank ``r`` solves its contiguous block of users (then of
  items) and the blocks are all-gathered; the CG solve is per row, so this is the single-process
  sweep, split.
* Rank 0 evaluates and writes the one artifact; the other ranks write nothing.

Backend: gloo on CPU, nccl when training on a GPU. Multi-node: torchrun's own rendezvous flags
(``--nnodes``, ``--node-rank``, ``--rdzv-endpoint``...), see docs/training.md.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    """This process's place among the training processes (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: str = "cpu"  # where the collectives' tensors live (nccl wants them on the GPU)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def writes(self) -> bool:
        """Whether this process evaluates and writes the artifact (rank 0)."""
        return self.rank == 0

    def block(self, n: int) -> tuple[int, int]:
        """This rank's contiguous share ``[lo, hi)`` of ``n`` rows (the first ranks one more)."""
        base, extra = divmod(n, self.world)
        lo = self.rank * base + min(self.rank, extra)
        return lo, lo + base + (1 if self.rank < extra else 0)

    # ------------------------------------------------------------- collectives
    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the ranks, in place (returned for chaining)."""
        if self.active:
            dist.all_reduce(tensor)
        return tensor

    def gather_blocks(self, block: torch.Tensor, n: int) -> torch.Tensor:
        """The ``[n, ...]`` table whose rank-``r`` rows are rank ``r``'s :meth:`block` of it."""
        if not self.active:
            return block
        sizes = [Ranks(r, self.world).block(n) for r in range(self.world)]
        largest = max(hi - lo for lo, hi in sizes)
        padded = torch.zeros((largest, *block.shape[1:]), dtype=block.dtype, device=block.device)
        padded[: len(block)] = block
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        return torch.cat([part[: hi - lo] for part, (lo, hi) in zip(parts, sizes, strict=True)])

    def gather_rows(
        self, rows: Sequence[torch.Tensor], values: Sequence[torch.Tensor], batch: int
    ) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Every rank's share of a global batch of ``batch`` rows (rank ``r`` holds rows ``r,
        r + N, ...``), concatenated in rank order: ``rows`` are index vectors, ``values`` tensors
        with one row per batch row. Two all-gathers, whatever the number of tensors."""
        if not self.active:
            return list(rows), list(values)
        shares = [len(range(r, batch, self.world)) for r in range(self.world)]
        largest, mine = max(shares), shares[self.rank]
        device = values[0].device
        widths = [math.prod(value.shape[1:]) for value in values]
        packed_rows = torch.zeros((len(rows), largest), dtype=torch.long, device=device)
        packed_values = torch.zeros((largest, sum(widths)), device=device)
        for k, index in enumerate(rows):
            packed_rows[k, :mine] = index
        column = 0
        for value, width in zip(values, widths, strict=True):
            packed_values[:mine, column : column + width] = value.reshape(mine, width)
            column += width
        gathered_rows = self._gather(packed_rows, dim=1, shares=shares)
        gathered_values = self._gather(packed_values, dim=0, shares=shares)
        out_values, column = [], 0
        for value, width in zip(values, widths, strict=True):
            part = gathered_values[:, column : column + width]
            out_values.append(part.reshape(-1, *value.shape[1:]))
            column += width
        return list(gathered_rows.unbind(0)), out_values

    def _gather(self, packed: torch.Tensor, *, dim: int, shares: list[int]) -> torch.Tensor:
        parts = [torch.empty_like(packed) for _ in range(self.world)]
        dist.all_gather(parts, packed.contiguous())
        return torch.cat(
            [part.narrow(dim, 0, n) for part, n in zip(parts, shares, strict=True)], dim
        )

    def agree(self, ok: bool) -> bool:
        """Whether every rank says ``ok`` (a check only rank 0 makes, such as a writable
        folder, must stop all of them, or the others would wait in a collective forever)."""
        if not self.active:
            return ok
        flag = torch.tensor([1 if ok else 0], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())


SINGLE = Ranks()


def from_environment(device: str = "cpu") -> Ranks:
    """The ranks torchrun describes in the environment (``WORLD_SIZE``, ``RANK``), the process
    group joined (nccl for a GPU, else gloo); one process of one without it."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return SINGLE
    gpu = device.startswith("cuda")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if gpu else "gloo")
    if gpu:  # one GPU per process: the one of this node's local rank
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)
    return Ranks(dist.get_rank(), dist.get_world_size(), device)


def shutdown(ranks: Ranks) -> None:
    if ranks.active and dist.is_initialized():
        dist.destroy_process_group()
