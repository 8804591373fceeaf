"""Cross-worker gathering for contrastive losses (the open_clip pattern)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the current torch.distributed group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


class _GatherForGlobalLoss(torch.autograd.Function):
    """All-gather whose backward returns the local shard's gradient times ``world_size``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        rank, world_size = distributed_world()
        ctx.rank, ctx.world_size, ctx.batch = rank, world_size, x.shape[0]
        shards = [torch.empty_like(x) for _ in range(world_size)]
        dist.all_gather(shards, x.contiguous())
        return torch.cat(shards, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start = ctx.rank * ctx.batch
        return grad[start : start + ctx.batch] * ctx.world_size


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (B, ...) from every worker into (world_size * B, ...), rank order, for
    a loss that every worker computes over the same global batch.

    Each worker's identical loss L depends on this worker's shard, so the shard's gradient
    summed over workers is ``world_size`` times the one computed here: the backward returns
    that (the sum without a collective, since every worker computed the same numbers). DDP
    then averages parameter gradients over the workers and training follows dL/dθ of the
    global-batch loss exactly, at any world size. Identity when torch.distributed is not
    initialised or has a single worker. All workers must pass the same local batch size.
    """
    _, world_size = distributed_world()
    if world_size == 1:
        return x
    return _GatherForGlobalLoss.apply(x)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather a tensor that needs no gradient (report semantics, labels)."""
    rank, world_size = distributed_world()
    if world_size == 1:
        return x.detach()
    shards = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(shards, x.detach().contiguous())
    return torch.cat(shards, dim=0)


def mean_over_workers(x: torch.Tensor) -> torch.Tensor:
    """The mean of ``x`` over all workers (a logged loss: each worker's own value differs
    for per-pair terms such as STA). ``x`` itself when not distributed."""
    _, world_size = distributed_world()
    if world_size == 1:
        return x
    total = x.detach().clone()
    dist.all_reduce(total)
    return total / world_size
