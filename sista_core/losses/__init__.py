"""SISTA losses: tensors in, scalar out (open_clip's shape). See docs/method.md."""

from .distributed import distributed_world, gather_no_grad, gather_with_grad, mean_over_workers
from .sia import (
    SIA_MODES,
    IntraLoss,
    SIALoss,
    false_negative_mask,
    intra_loss,
    report_similarity,
    sia_loss,
)
from .sparse_attention import SPARSE_KINDS, sparse_normalize, topk_softmax
from .sta import STALoss, attention_nonzero_per_word, sta_loss

__all__ = [
    "SIA_MODES",
    "SPARSE_KINDS",
    "IntraLoss",
    "SIALoss",
    "STALoss",
    "attention_nonzero_per_word",
    "distributed_world",
    "false_negative_mask",
    "gather_no_grad",
    "gather_with_grad",
    "intra_loss",
    "mean_over_workers",
    "report_similarity",
    "sia_loss",
    "sparse_normalize",
    "sta_loss",
    "topk_softmax",
]
