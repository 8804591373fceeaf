"""Cross-worker gathering for contrastive losses (the open_clip pattern)."""

from __future__ import annotations

import torch
import torch.distributed as dist


def distributed_world() -> tuple[int, int]:
    """(rank, world_size) of the current torch.distributed group; (0, 1) when not distributed."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather ``x`` (B, ...) from every worker into (world_size * B, ...), rank order.

    The local shard keeps its autograd graph; the other shards are constants. With DDP
    averaging the parameter gradients, each worker's loss over the global batch then trains
    its own embeddings against every negative in the global batch. Identity when
    torch.distributed is not initialised or has a single worker. All workers must pass the
    same local batch size.
    """
    rank, world_size = distributed_world()
    if world_size == 1:
        return x
    shards = [torch.empty_like(x) for _ in range(world_size)]
    dist.all_gather(shards, x.contiguous())
    shards[rank] = x
    return torch.cat(shards, dim=0)


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """All-gather a tensor that needs no gradient (report semantics, labels)."""
    with torch.no_grad():
        return gather_with_grad(x.detach())
