"""Process-group helpers shared by every batch-statistics layer and distributed training tool.

torch's ``nn.SyncBatchNorm`` runs only on GPU; normlab's batch-statistics layers (PowerNorm,
UnifiedNorm, ...) instead sum their statistics across ranks with :func:`all_reduce_sum`, which works
with the gloo backend on CPU and NCCL on GPU alike, and is a no-op when ``torch.distributed`` is not
initialized or the group has a single rank (so single-process code pays nothing).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["all_reduce_sum", "is_distributed", "rank", "world_size"]


def is_distributed(process_group: dist.ProcessGroup | None = None) -> bool:
    """Whether ``torch.distributed`` is initialized and ``process_group`` (default: WORLD) has > 1 rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(process_group) > 1


def world_size(process_group: dist.ProcessGroup | None = None) -> int:
    """Ranks in ``process_group``; 1 when ``torch.distributed`` is not initialized."""
    return dist.get_world_size(process_group) if dist.is_available() and dist.is_initialized() else 1


def rank(process_group: dist.ProcessGroup | None = None) -> int:
    """This process's rank in ``process_group``; 0 when ``torch.distributed`` is not initialized."""
    return dist.get_rank(process_group) if dist.is_available() and dist.is_initialized() else 0


class _AllReduceSum(torch.autograd.Function):
    """``SUM`` all-reduce of one flat buffer whose backward is the same all-reduce of the gradient: every
    rank's loss depends on the global sum, so the gradient of a rank's local part is the sum over ranks
    of the gradients each rank computed for the global sum."""

    @staticmethod
    def forward(ctx, flat: torch.Tensor, process_group) -> torch.Tensor:
        ctx.process_group = process_group
        out = flat.clone()
        dist.all_reduce(out, op=dist.ReduceOp.SUM, group=process_group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM, group=ctx.process_group)
        return grad, None


def all_reduce_sum(*tensors: torch.Tensor, process_group: dist.ProcessGroup | None = None
                   ) -> tuple[torch.Tensor, ...]:
    """Each tensor summed over the ranks of ``process_group``, in one collective.

    The tensors (any shapes, one dtype) are packed into one flat buffer, all-reduced with ``SUM`` and
    split back, so a layer's statistic and its count cost one round trip. The reduction is
    differentiable: under autograd its backward all-reduces the gradient the same way, so a layer that
    normalizes by global statistics gets the gradient of one process holding the whole batch (every rank
    must then run backward, as under DDP). The inputs are not modified; without a multi-rank process
    group they are returned as they are.
    """
    if not is_distributed(process_group):
        return tensors
    dtypes = {t.dtype for t in tensors}
    if len(dtypes) != 1:
        raise TypeError(f"all_reduce_sum needs tensors of one dtype, got {sorted(map(str, dtypes))}")
    flat = torch.cat([t.reshape(-1) for t in tensors])
    if torch.is_grad_enabled() and flat.requires_grad:
        flat = _AllReduceSum.apply(flat, process_group)
    else:
        dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=process_group)
    return tuple(part.view_as(t) for part, t in zip(flat.split([t.numel() for t in tensors]), tensors))

