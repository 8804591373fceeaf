"""STA: sparse token alignment (METHOD.md, "STA").

Each word attends sparsely to the patches of its own image and each patch to the words of
its own report; the attended vector should be closer to its query than to the other
queries' attended vectors. Vectorised over the batch with padding masks.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .sparse_attention import SPARSE_KINDS, sparse_normalize

# Fill for scores of padded words: far below any cosine / temperature, finite so that
# sparsemax and entmax stay NaN-free, and exactly zero weight after every normaliser.
_PADDING_SCORE = -1.0e4


def _local_contrastive(
    queries: torch.Tensor,
    attended: torch.Tensor,
    query_weight: torch.Tensor,
    candidate_mask: torch.Tensor | None,
    temperature: float,
) -> torch.Tensor:
    """Per-sample -sum_k w_k log softmax_{k'}( cos(q_k, a_k') / T )[k], (B,).

    queries: (B, N, d) normalised; attended: (B, N, d); query_weight: (B, N) summing to 1 per
    sample (or all zero); candidate_mask: (B, N) which k' may appear in the denominator
    (None: all of them).
    """
    attended = F.normalize(attended, dim=-1)
    queries = queries / temperature  # scale the (B, N, d) operand, not the (B, N, N) scores
    scores = queries @ attended.transpose(1, 2)
    if candidate_mask is not None:
        # A sample with no candidate at all (an empty report) has zero weight; opening its
        # candidates keeps its log-sum-exp finite so that no NaN reaches the gradients.
        candidate_mask = candidate_mask | ~candidate_mask.any(-1, keepdim=True)
        scores = scores.masked_fill(~candidate_mask[:, None, :], float("-inf"))
    matched = (queries * attended).sum(-1)  # the diagonal of scores, without a gather
    matched_log_prob = matched - torch.logsumexp(scores, dim=-1)
    matched_log_prob = matched_log_prob.masked_fill(query_weight == 0, 0.0)
    return -(query_weight * matched_log_prob).sum(-1)


def _patch_to_word_term(
    word_patch_cos_scaled: torch.Tensor,
    patch_to_word: torch.Tensor,
    words: torch.Tensor,
    patch_weight: torch.Tensor,
) -> torch.Tensor:
    """``_local_contrastive`` for patches against their grounded text vectors d_m' = beta_m' W,
    computed in word space: <p_m, d_m'> = (P W^T beta^T)_{mm'} and |d_m'|^2 = beta G beta^T
    with G = W W^T. This reuses the word-patch cosines already computed and contracts over
    Nw instead of d, halving the largest product, (B, Np, Np).

    word_patch_cos_scaled: (B, Nw, Np) cos(w_k, p_m) / temperature_local; patch_to_word:
    (B, Np, Nw); words: (B, Nw, d) normalised; patch_weight: (B, Np). Returns (B,).
    """
    gram = words @ words.transpose(1, 2)  # (B, Nw, Nw)
    text_norm = ((patch_to_word @ gram) * patch_to_word).sum(-1).clamp_min(1e-24).sqrt()
    patch_word_cos = word_patch_cos_scaled.transpose(1, 2)  # (B, Np, Nw)
    scores = patch_word_cos @ (patch_to_word / text_norm[..., None]).transpose(1, 2)
    matched = (patch_word_cos * patch_to_word).sum(-1) / text_norm  # diagonal of scores
    matched_log_prob = (matched - torch.logsumexp(scores, dim=-1)).masked_fill(
        patch_weight == 0, 0.0
    )
    return -(patch_weight * matched_log_prob).sum(-1)


def _normalise_weights(weights: torch.Tensor) -> torch.Tensor:
    total = weights.sum(-1, keepdim=True)
    return torch.where(total > 0, weights / total.clamp_min(1e-12), torch.zeros_like(weights))


def sta_loss(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    patches: torch.Tensor,
    *,
    temperature_attn: float = 0.1,
    temperature_local: float = 0.1,
    sparse: str = "sparsemax",
    topk: int = 8,
    return_attention: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Sparse word-patch alignment loss, averaged over samples that have at least one word.

    words: (B, Nw, d) projected word features; word_mask: (B, Nw) bool, True for real words
    (False for padding, punctuation, special tokens, ``XXXX``); patches: (B, Np, d).
    sparse: ``sparsemax`` | ``entmax15`` | ``topk`` | ``softmax`` (dense, MGCA-style).
    With ``return_attention`` also returns the word-to-patch attention (B, Nw, Np), zero on
    masked words: the interpretable heat maps.
    """
    if sparse not in SPARSE_KINDS:
        raise ValueError(f"sparse must be one of {SPARSE_KINDS}, got {sparse!r}")
    word_mask = word_mask.bool()
    words = F.normalize(words.float(), dim=-1)
    patches = F.normalize(patches.float(), dim=-1)
    affinity = (words / temperature_attn) @ patches.transpose(1, 2)  # (B, Nw, Np)

    # Word to patch: each real word picks a few patches; c_k is its grounded visual vector.
    word_to_patch = sparse_normalize(affinity, sparse, topk=topk, dim=-1)
    word_to_patch = word_to_patch * word_mask[..., None]
    grounded_visual = word_to_patch @ patches  # (B, Nw, d)
    word_weight = _normalise_weights(word_mask.float())
    word_term = _local_contrastive(
        words, grounded_visual, word_weight, word_mask, temperature_local
    )

    # Patch to word: each patch picks a few real words; patches no word selects weigh 0.
    patch_scores = affinity.transpose(1, 2).masked_fill(~word_mask[:, None, :], _PADDING_SCORE)
    patch_to_word = sparse_normalize(patch_scores, sparse, topk=topk, dim=-1)
    selected_patch = word_to_patch.amax(dim=1) > 0  # (B, Np)
    patch_weight = _normalise_weights(selected_patch.float())
    patch_term = _patch_to_word_term(
        affinity * (temperature_attn / temperature_local), patch_to_word, words, patch_weight
    )

    has_words = word_mask.any(dim=-1)
    per_sample = 0.5 * (word_term + patch_term)
    loss = (per_sample * has_words).sum() / has_words.sum().clamp_min(1)
    if return_attention:
        return loss, word_to_patch
    return loss


def attention_nonzero_per_word(attention: torch.Tensor, word_mask: torch.Tensor) -> torch.Tensor:
    """Mean count of patches with non-zero attention per real word (scalar)."""
    nonzero = (attention > 0).sum(-1).float()  # (B, Nw)
    mask = word_mask.bool()
    return nonzero[mask].mean() if mask.any() else nonzero.new_zeros(())


class STALoss(nn.Module):
    """``sta_loss`` as a module. Token alignment is within each pair, so it needs no
    cross-worker gathering."""

    def __init__(
        self,
        temperature_attn: float = 0.1,
        temperature_local: float = 0.1,
        sparse: str = "sparsemax",
        topk: int = 8,
    ) -> None:
        super().__init__()
        if sparse not in SPARSE_KINDS:
            raise ValueError(f"sparse must be one of {SPARSE_KINDS}, got {sparse!r}")
        self.temperature_attn, self.temperature_local = temperature_attn, temperature_local
        self.sparse, self.topk = sparse, topk

    def forward(
        self, words: torch.Tensor, word_mask: torch.Tensor, patches: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """Returns ``loss``, ``attention`` (B, Nw, Np) and ``attention_nonzero_per_word``."""
        loss, attention = sta_loss(
            words,
            word_mask,
            patches,
            temperature_attn=self.temperature_attn,
            temperature_local=self.temperature_local,
            sparse=self.sparse,
            topk=self.topk,
            return_attention=True,
        )
        return {
            "loss": loss,
            "attention": attention,
            "attention_nonzero_per_word": attention_nonzero_per_word(attention, word_mask),
        }
