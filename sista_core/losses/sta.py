"""STA: sparse token alignment (docs/method.md, "STA").

Each word attends sparsely to the patches of its own image and each patch to the words of
its own report; the attended vector should be closer to its query than to the other
queries' attended vectors. Vectorised over the batch with padding masks.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.autograd.function import once_differentiable

from .sparse_attention import SPARSE_KINDS, sparse_normalize

# Added to the scores of padded words: far below any cosine / temperature, finite so that
# sparsemax and entmax stay NaN-free, and exactly zero weight after every normaliser.
_PADDING_SCORE = -1.0e4

# As F.normalize: vectors shorter than this are divided by it instead of their norm.
_NORM_EPS = 1e-12


class _ScaledUnit(torch.autograd.Function):
    """``scale * F.normalize(x, dim=-1)`` with a one-expression backward.

    Autograd through F.normalize differentiates a division by a broadcast norm: a chain of
    full-size div, mul, neg, masked_fill and add. The Jacobian is (scale/|x|)(I - u u^T),
    u = x/|x|, so grad_x = (scale/|x|)(g - u (u.g)): one reduction and two passes.
    """

    @staticmethod
    def forward(ctx, x, scale):
        norm = torch.linalg.vector_norm(x, dim=-1, keepdim=True)
        long_enough = norm > _NORM_EPS  # shorter vectors are divided by eps: no projection
        inverse = scale / norm.clamp_min(_NORM_EPS)
        unit = x * inverse
        ctx.save_for_backward(unit, inverse, long_enough)
        ctx.scale = scale
        return unit

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_unit):
        unit, inverse, long_enough = ctx.saved_tensors
        # unit = scale * u, so u (u.g) = unit (unit.g) / scale^2.
        along = (unit * grad_unit).sum(-1, keepdim=True) * long_enough / ctx.scale**2
        return torch.addcmul(grad_unit, unit, along, value=-1).mul_(inverse), None


def unit_vectors(x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:
    """``scale * x / |x|`` along the last dim (``scale * F.normalize(x, dim=-1)``)."""
    return _ScaledUnit.apply(x, scale)


def _product_like(a: torch.Tensor, b: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """a @ b, laid out in memory like ``like``: a gradient in its tensor's own layout keeps the
    elementwise backward passes that follow on contiguous memory."""
    if like.dim() == 3 and like.stride(1) == 1 and like.stride(2) != 1:  # a transposed view
        return (b.transpose(1, 2) @ a.transpose(1, 2)).transpose(1, 2)
    return a @ b


class _PaddedAffinity(torch.autograd.Function):
    """``padding + words @ patches^T`` whose patch gradient is made patch-major,
    grad^T @ words, (B, Np, d): autograd's words^T @ grad is (B, d, Np), slower to produce,
    and adding it to the grounded visual vectors' (B, Np, d) gradient is a strided pass."""

    @staticmethod
    def forward(ctx, words, patches, padding):
        ctx.save_for_backward(words, patches)
        return torch.baddbmm(padding, words, patches.transpose(1, 2))

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_affinity):
        words, patches = ctx.saved_tensors
        grad_words = grad_affinity @ patches if ctx.needs_input_grad[0] else None
        grad_patches = None
        if ctx.needs_input_grad[1]:
            grad_patches = grad_affinity.transpose(1, 2) @ words
        return grad_words, grad_patches, None


class _MatchedLogSoftmax(torch.autograd.Function):
    """Per-sample -sum_r w_r log softmax_j(<q_r, k_j>)[t_r]: the weighted InfoNCE terms of
    STA, where query r's positive is key t_r and the other keys of its sample are negatives.

    Autograd through ``logsumexp`` recomputes exp(S - lse) in backward and makes several
    temporaries of the largest tensor, S (B, Nq, Nk). Here forward keeps the softmax minus
    the one-hot targets, and backward runs the two products autograd would run anyway, with
    the weights applied to the smaller operands.
    """

    @staticmethod
    def forward(ctx, queries, keys, target, weight, key_mask):
        scores = queries @ keys.transpose(1, 2)  # (B, Nq, Nk)
        if key_mask is not None:
            scores.masked_fill_(~key_mask[:, None, :], float("-inf"))
        row_max = scores.amax(dim=-1)
        matched = scores.gather(-1, target[..., None]).squeeze(-1)
        probs = torch.softmax(scores, dim=-1)
        # The largest probability is exp(max - lse) = 1 / sum_j exp(s_j - max), at least
        # 1/Nk: log-sum-exp without another pass over the scores, and no underflow.
        log_sum_exp = row_max - probs.amax(dim=-1).log()
        # Rows of weight 0 may have a masked positive (log 0 = -inf): leave them out, no NaN.
        loss = -torch.where(weight > 0, weight * (matched - log_sum_exp), 0.0).sum(-1)
        # d loss / d scores = w (softmax - onehot(t)): subtracting the one-hot here touches
        # one entry per row, and spares backward a gather of the positive keys and a scatter
        # of their gradients, each a pass over a (B, Nq, D) or (B, Nk, D) tensor.
        probs.scatter_add_(-1, target[..., None], probs.new_full((*target.shape, 1), -1.0))
        ctx.save_for_backward(queries, keys, probs, weight)
        return loss

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss):
        queries, keys, probs_minus_onehot, weight = ctx.saved_tensors
        # grad_scores = w g (softmax - onehot(t)) is never formed: the weights are applied on
        # the (B, Nq, D) side of each product, which is smaller than (B, Nq, Nk).
        row_grad = (weight * grad_loss[:, None])[..., None]  # (B, Nq, 1)
        grad_queries = None
        if ctx.needs_input_grad[0]:
            grad_queries = (probs_minus_onehot @ keys).mul_(row_grad)
        grad_keys = None
        if ctx.needs_input_grad[1]:
            grad_keys = _product_like(probs_minus_onehot.transpose(1, 2), queries * row_grad, keys)
        return grad_queries, grad_keys, None, None, None


def matched_log_softmax_loss(
    queries: torch.Tensor,
    keys: torch.Tensor,
    target: torch.Tensor,
    weight: torch.Tensor,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample -sum_r weight_r log softmax_j(queries_r . keys_j)[target_r], (B,).

    queries: (B, Nq, D); keys: (B, Nk, D); target: (B, Nq) long, the positive key of each
    query; weight: (B, Nq); key_mask: (B, Nk) bool, the keys that may appear in the
    denominator (None: all). Every row needs at least one open key. Gradients flow to
    queries and keys only: target, weight and key_mask are constants.
    """
    return _MatchedLogSoftmax.apply(queries, keys, target, weight, key_mask)


def _word_to_patch_term(
    words: torch.Tensor,
    grounded_visual: torch.Tensor,
    word_weight: torch.Tensor,
    word_mask: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """Per-sample -sum_k w_k log softmax_{k'}( cos(w_k, c_k') / T )[k], k' over the real words
    of the sample, (B,). words: (B, Nw, d) normalised; grounded_visual c: (B, Nw, d)."""
    # A sample with no word at all (an empty report) has zero weight; opening its candidates
    # keeps its log-softmax finite so that no NaN reaches the gradients.
    candidate_mask = word_mask | ~word_mask.any(-1, keepdim=True)
    target = torch.arange(words.shape[1], device=words.device).expand(words.shape[:2])
    return matched_log_softmax_loss(
        words,
        unit_vectors(grounded_visual, scale=1 / temperature),  # 1/T within the normalising
        target,
        word_weight,
        candidate_mask,
    )


def _rows_with_weight(weight: torch.Tensor) -> torch.Tensor:
    """Indices (B, R) of the rows with non-zero weight, packed to the front of each sample in
    their original order and padded with zero-weight rows up to the largest count R."""
    selected = weight > 0
    count = int(selected.sum(-1).max())
    if count == weight.shape[-1]:
        return torch.arange(count, device=weight.device).expand(weight.shape)
    order = torch.sort(selected.to(torch.uint8), dim=-1, descending=True, stable=True).indices
    return order[:, :count]


class _UnitGroundedText(torch.autograd.Function):
    """Word weights of the normalised grounded text vectors, times ``scale``: s beta_m / |d_m|
    with d_m = W^T beta_m, where |d_m|^2 = beta_m^T G beta_m and G = W W^T, so d (B, Np, d)
    is never formed. Input and output are word-major, (B, Nw, Np).

    With x = beta_m, r = |d_m|^-1, g the output gradient and c = s r^3 (x.g), the backward
    is grad_x = s r g - c G x (G x is kept from forward) and grad_G = -X diag(c) X^T / 2,
    which is symmetric, so grad_W = 2 grad_G W: two products where autograd through the
    gram matrix and the quadratic form runs four, and a few elementwise passes instead of a
    chain of mul, sum, rsqrt, clamp and add backwards. |d_m| is clamped at 1e-12, like
    F.normalize.
    """

    @staticmethod
    def forward(ctx, words, weights_t, scale):
        gram_weights = (words @ words.transpose(1, 2)) @ weights_t  # G X, (B, Nw, Np)
        norm_sq = (gram_weights * weights_t).sum(1, keepdim=True)  # (B, 1, Np)
        long_enough = norm_sq > 1e-24  # shorter vectors are divided by 1e-12: no projection
        inverse = norm_sq.clamp_min(1e-24).rsqrt()
        ctx.save_for_backward(words, weights_t, gram_weights, inverse, long_enough)
        ctx.scale = scale
        return weights_t * (inverse * scale)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_out):
        words, weights_t, gram_weights, inverse, long_enough = ctx.saved_tensors
        scratch = weights_t * grad_out  # (B, Nw, Np), reused below while it is in the cache
        along = scratch.sum(1, keepdim=True).mul_(inverse**3 * long_enough * ctx.scale)
        grad_weights_t = torch.mul(grad_out, inverse * ctx.scale)
        grad_weights_t.addcmul_(gram_weights, along, value=-1)
        grad_words = None
        if ctx.needs_input_grad[0]:
            scaled = torch.mul(weights_t, along, out=scratch)
            grad_words = -((scaled @ weights_t.transpose(1, 2)) @ words)
        return grad_words, grad_weights_t, None


def _patch_to_word_term(
    affinity: torch.Tensor,
    score_scale: float,
    patch_to_word_t: torch.Tensor,
    words: torch.Tensor,
    patch_weight: torch.Tensor,
) -> torch.Tensor:
    """Per-sample -sum_m u_m log softmax_{m'}( cos(p_m, d_m') / T )[m], (B,), for patches
    against their grounded text vectors d_m' = beta_m' W, computed in word space:
    <p_m, d_m'> = (P W^T beta^T)_{mm'} and |d_m'|^2 = beta G beta^T with G = W W^T. This
    reuses the word-patch cosines already computed and contracts over Nw instead of d,
    halving the largest product, (B, Np, Np). Only the patches some word selects are
    queries (the others weigh 0), so that product shrinks further to (B, R, Np).

    affinity: (B, Nw, Np) word-patch cosines / temperature_attn, _PADDING_SCORE added to
    padded words (they meet zero weights in beta); score_scale: temperature_attn /
    temperature_local; patch_to_word_t: beta^T, (B, Nw, Np), kept word-major like affinity
    so that the elementwise passes run on contiguous memory; words: (B, Nw, d) normalised;
    patch_weight: (B, Np).
    """
    # d_m' / |d_m'| in word space, times the score scale: scaling these (B, 1, Np) norms is
    # free, scaling the queries or the scores would be a pass over a large tensor.
    keys_t = _UnitGroundedText.apply(words, patch_to_word_t, score_scale)
    rows = _rows_with_weight(patch_weight)  # (B, R)
    index = rows[:, None, :].expand(-1, affinity.shape[1], -1)
    queries = affinity.gather(2, index).transpose(1, 2)  # (B, R, Nw)
    return matched_log_softmax_loss(
        queries, keys_t.transpose(1, 2), rows, patch_weight.gather(1, rows)
    )


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
    # float32 throughout, autocast or not: the hand-written backwards below expect their
    # saved tensors in one dtype, and the sparse maps need the precision.
    with torch.autocast(words.device.type, enabled=False):
        return _sta_loss_float32(
            words.float(),
            word_mask.bool(),
            patches.float(),
            temperature_attn,
            temperature_local,
            sparse,
            topk,
            return_attention,
        )


def _sta_loss_float32(
    words: torch.Tensor,
    word_mask: torch.Tensor,
    patches: torch.Tensor,
    temperature_attn: float,
    temperature_local: float,
    sparse: str,
    topk: int,
    return_attention: bool,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """``sta_loss`` on float32 inputs with autocast off."""
    words = unit_vectors(words)
    # Patches scaled by 1/temperature_attn give the affinity in one product; the grounded
    # visual vectors built from them are normalised, so the scale drops out there.
    scaled_patches = unit_vectors(patches, scale=1 / temperature_attn)
    # (B, Nw, Np) cos(w_k, p_m) / temperature_attn, with _PADDING_SCORE added to the padded
    # words inside the product (a masked_fill costs two more full passes). It serves both
    # directions: no patch picks a padded word, and the padded words' own rows weigh
    # nothing below. So, as with a masked_fill, no gradient reaches the padded entries.
    padding = torch.where(word_mask, 0.0, _PADDING_SCORE)[..., None]
    affinity = _PaddedAffinity.apply(words, scaled_patches, padding)

    # Word to patch: each real word picks a few patches; c_k is its grounded visual vector.
    # The padded words' rows are left as they come (zeroing them is a pass over the map and
    # another over its gradient): their grounded vectors are never a query or a candidate.
    word_to_patch = sparse_normalize(affinity, sparse, topk=topk, dim=-1)
    grounded_visual = word_to_patch @ scaled_patches  # (B, Nw, d), up to the scale
    word_weight = _normalise_weights(word_mask.float())
    word_term = _word_to_patch_term(
        words, grounded_visual, word_weight, word_mask, temperature_local
    )

    # Patch to word: each patch picks a few real words; patches no word selects weigh 0.
    patch_to_word_t = sparse_normalize(affinity, sparse, topk=topk, dim=1)  # (B, Nw, Np)
    # Selected by some real word: the real words' weights summed over the words are positive.
    real_words = word_mask.to(word_to_patch.dtype)[:, None, :]  # (B, 1, Nw)
    selected_patch = (real_words @ word_to_patch.detach()).squeeze(1) > 0  # (B, Np)
    patch_weight = _normalise_weights(selected_patch.float())
    patch_term = _patch_to_word_term(
        affinity, temperature_attn / temperature_local, patch_to_word_t, words, patch_weight
    )

    has_words = word_mask.any(dim=-1)
    per_sample = 0.5 * (word_term + patch_term)
    loss = (per_sample * has_words).sum() / has_words.sum().clamp_min(1)
    if return_attention:
        return loss, word_to_patch * word_mask[..., None]
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
