"""The losses written out as docs/method.md states them: one report (or one row) at a time,
in plain tensor operations, without the library's vectorised kernels or normalisers. Slow on
purpose: tests check the library against them and ``bench/losses.py`` times the library
against them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def reference_normalise(scores: torch.Tensor, sparse: str, topk: int = 8) -> torch.Tensor:
    """Each map along the last dim: sparsemax by its sort-based closed form, 1.5-entmax by
    bisection on its threshold, top-k as a softmax renormalised over the k largest scores."""
    if sparse == "softmax":
        exp = (scores - scores.amax(-1, keepdim=True)).exp()
        return exp / exp.sum(-1, keepdim=True)
    if sparse == "topk":
        kept = scores >= scores.topk(min(topk, scores.shape[-1]), dim=-1).values[..., -1:]
        exp = (scores - scores.amax(-1, keepdim=True)).exp() * kept
        return exp / exp.sum(-1, keepdim=True)
    if sparse == "entmax15":
        # p_i = [z_i / 2 - tau]_+^2 summing to one. Its support by bisection on tau; then tau in
        # closed form on that support (the root of sum (h_i - tau)^2 = 1 below every h_i), so
        # the gradient is exact.
        half = scores.double() / 2
        with torch.no_grad():
            low, high = half.amax(-1, keepdim=True) - 1, half.amax(-1, keepdim=True)
            for _ in range(100):
                tau = (low + high) / 2
                total = (half - tau).clamp(min=0).pow(2).sum(-1, keepdim=True)
                low, high = torch.where(total >= 1, tau, low), torch.where(total >= 1, high, tau)
            support = (half > (low + high) / 2).double()
        size = support.sum(-1, keepdim=True)
        first, second = (
            (half * support).sum(-1, keepdim=True),
            (half**2 * support).sum(-1, keepdim=True),
        )
        tau = (first - (first**2 - size * (second - 1)).clamp(min=0).sqrt()) / size
        return (half - tau).clamp(min=0).pow(2).to(scores.dtype)
    # sparsemax: sorted z, support size k = max{k : 1 + k z_(k) > sum_{j<=k} z_(j)}, threshold
    # (sum of the support - 1) / k.
    ordered = scores.sort(-1, descending=True).values
    cumulative = ordered.cumsum(-1)
    ranks = torch.arange(1, scores.shape[-1] + 1, dtype=scores.dtype, device=scores.device)
    support = (1 + ranks * ordered > cumulative).sum(-1, keepdim=True)
    threshold = (cumulative.gather(-1, support - 1) - 1) / support
    return (scores - threshold).clamp(min=0)


def sta_loss_per_sample_loop(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    patches: torch.Tensor,
    *,
    temperature_attn: float = 0.1,
    temperature_local: float = 0.1,
    sparse: str = "sparsemax",
    topk: int = 8,
) -> torch.Tensor:
    """STA one report at a time on its real words only (MGCA computes its token loss so)."""
    per_sample = []
    for i in range(words.shape[0]):
        w = F.normalize(words[i][word_mask[i]], dim=-1)  # (n_i, d)
        if w.shape[0] == 0:
            continue  # an empty report is left out of the mean
        p = F.normalize(patches[i], dim=-1)  # (Np, d)
        affinity = w @ p.T / temperature_attn
        alpha = reference_normalise(affinity, sparse, topk)  # each word over the patches
        grounded_visual = F.normalize(alpha @ p, dim=-1)
        word_scores = w @ grounded_visual.T / temperature_local
        word_term = -F.log_softmax(word_scores, dim=-1).diagonal().mean()
        beta = reference_normalise(affinity.T, sparse, topk)  # each patch over the words
        grounded_text = F.normalize(beta @ w, dim=-1)
        patch_scores = p @ grounded_text.T / temperature_local
        selected = (alpha.amax(dim=0) > 0).float()  # patches some real word selects
        patch_log_prob = F.log_softmax(patch_scores, dim=-1).diagonal()
        patch_term = -(selected * patch_log_prob).sum() / selected.sum()
        per_sample.append(0.5 * (word_term + patch_term))
    return torch.stack(per_sample).mean()


def sia_loss_per_row_loop(
    img: torch.Tensor,
    txt: torch.Tensor,
    report_sim: torch.Tensor,
    *,
    temperature: float = 0.07,
    threshold: float = 0.9,
) -> torch.Tensor:
    """SIA (eliminate) one row of the similarity matrix at a time: a pair whose reports are at
    least ``threshold`` alike (itself excepted) is no negative."""
    img, txt = F.normalize(img, dim=-1), F.normalize(txt, dim=-1)
    rows = []
    for i in range(img.shape[0]):
        eliminated = report_sim[i] >= threshold
        eliminated[i] = False
        for queries, keys in ((img, txt), (txt, img)):
            logits = queries[i] @ keys.T / temperature
            rows.append(-F.log_softmax(logits.masked_fill(eliminated, float("-inf")), 0)[i])
    return torch.stack(rows).sum() / (2 * img.shape[0])
