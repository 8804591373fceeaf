"""Cross-modal retrieval recall@k on paired held-out embeddings (a cheap validation signal)."""

from __future__ import annotations

from collections.abc import Sequence

import torch


def recall_at_k(
    image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10)
) -> dict[str, float]:
    """Image-to-text and text-to-image recall@k for N pairs: row i of ``image_emb`` (N, d)
    and row i of ``text_emb`` (N, d) belong together. Scores are dot products, so pass
    normalised embeddings for cosine similarity.

    Returns ``image_to_text_recall_at_{k}`` and ``text_to_image_recall_at_{k}`` for each k:
    the fraction of queries whose partner is among their k best-scoring candidates.
    """
    similarity = image_emb @ text_emb.T  # (N, N): rows are image queries, columns text ones
    matched = similarity.diagonal()
    # A partner's rank is the number of candidates scoring strictly higher. Ties count for the
    # match: identical reports (the frequent normal ones) embed identically, and retrieving
    # any copy of the right text is a correct hit.
    image_rank = (similarity > matched[:, None]).sum(1)
    text_rank = (similarity > matched[None, :]).sum(0)
    recall = {}
    for k in ks:
        recall[f"image_to_text_recall_at_{k}"] = float((image_rank < k).float().mean())
        recall[f"text_to_image_recall_at_{k}"] = float((text_rank < k).float().mean())
    return recall
