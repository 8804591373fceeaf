"""The hand-written autograd Functions behind ``sta_loss``: each equals the straightforward
autograd version (values and gradients) and passes gradcheck in float64."""

import pytest
import torch
import torch.nn.functional as F
from entmax import entmax_bisect
from entmax import sparsemax as entmax_sparsemax

from sista_core.losses import sta_loss
from sista_core.losses.reference import reference_normalise, sta_loss_per_sample_loop
from sista_core.losses.sparse_attention import sparse_normalize, sparsemax
from sista_core.losses.sta import (
    _PaddedAffinity,
    _rows_with_weight,
    _UnitGroundedText,
    matched_log_softmax_loss,
    unit_vectors,
)


def randn(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def value_and_grads(fn, *inputs, grad_output=None):
    leaves = [x.detach().clone().requires_grad_(True) for x in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) if grad_output is None else grad_output)
    return out.detach(), [leaf.grad for leaf in leaves]


# --- sparsemax -----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [10.0, 1.0, 0.01])  # few, some and all entries on support
@pytest.mark.parametrize("dim", [-1, 1])
def test_sparsemax_equals_entmax_sparsemax(scale, dim):
    scores = randn(4, 24, 40) * scale
    scores[0, 3] = -1.0e4  # a padded row: far below, all equal
    grad_output = randn(4, 24, 40, seed=1)
    ours, our_grad = value_and_grads(
        lambda x: sparsemax(x, dim=dim), scores, grad_output=grad_output
    )
    ref, ref_grad = value_and_grads(
        lambda x: entmax_sparsemax(x, dim=dim), scores, grad_output=grad_output
    )
    assert torch.equal(ours == 0, ref == 0)  # the same exact zeros
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(our_grad[0], ref_grad[0], atol=1e-5)
    assert torch.allclose(ours.sum(dim), torch.ones(()), atol=1e-5)


def test_sparsemax_of_equal_scores_is_uniform():
    assert torch.allclose(sparsemax(torch.full((3, 5), -7.0)), torch.full((3, 5), 0.2))


def test_sparsemax_on_the_support_boundary_and_ties():
    scores = torch.tensor([[1.0, 0.0, 0.0], [2.0, 2.0, -5.0], [1.0, 0.5, 0.0]])
    expected = torch.tensor([[1.0, 0.0, 0.0], [0.5, 0.5, 0.0], [0.75, 0.25, 0.0]])
    assert torch.allclose(sparsemax(scores), expected, atol=1e-7)


def test_sparsemax_of_two_or_three_scores_equals_the_closed_form():
    """With n scores z_1 >= ... >= z_n, tau = (sum of the k largest - 1) / k for the largest k
    with z_k > tau; written out here for n = 2 and 3."""
    for row in ([0.3, 0.0], [2.0, 0.0], [0.4, 0.2, 0.0], [1.0, 0.9, -0.5]):
        z = torch.tensor(row)
        for k in range(len(row), 0, -1):
            tau = (z[:k].sum() - 1) / k
            if z[k - 1] > tau:
                break
        expected = (z - tau).clamp(min=0)
        assert torch.allclose(sparsemax(z[None]), expected[None], atol=1e-7), row


def test_sparsemax_of_half_precision_scores_is_solved_in_float32():
    scores = (randn(6, 50) * 10).bfloat16()
    weights = sparsemax(scores.requires_grad_(True))
    assert weights.dtype == torch.bfloat16
    assert torch.allclose(weights.float(), entmax_sparsemax(scores.float(), dim=-1), atol=1e-2)
    # Solved in float32, rounded once: bit for bit the float32 result in bfloat16 (with most
    # of a row on the support, solving in bfloat16 itself rounds tau differently).
    close = (randn(6, 50) * 0.5).bfloat16()
    assert torch.equal(sparsemax(close), sparsemax(close.float()).bfloat16())
    weights.float().pow(2).sum().backward()
    assert scores.grad.dtype == torch.bfloat16 and torch.isfinite(scores.grad.float()).all()


def test_sparsemax_gradcheck():
    # Scores spread well apart, so that no finite-difference step crosses a support edge.
    scores = torch.randperm(60, generator=torch.Generator().manual_seed(0)).double() / 17
    scores = scores.reshape(3, 4, 5).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x: sparsemax(x, dim=-1), (scores,))
    assert torch.autograd.gradcheck(lambda x: sparsemax(x, dim=1), (scores,))


# --- unit vectors ----------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [1.0, 10.0])
def test_unit_vectors_equal_scaled_f_normalize(scale):
    x = randn(3, 5, 8)
    x[0, 1] = 0.0  # a zero vector stays zero, as in F.normalize
    x[1, 2] = 1e-14  # shorter than eps: divided by eps, as in F.normalize
    grad_output = randn(3, 5, 8, seed=1)
    ours, our_grad = value_and_grads(lambda v: unit_vectors(v, scale), x, grad_output=grad_output)
    ref, ref_grad = value_and_grads(
        lambda v: scale * F.normalize(v, dim=-1), x, grad_output=grad_output
    )
    assert torch.allclose(ours, ref, atol=1e-6)
    assert torch.allclose(our_grad[0], ref_grad[0], rtol=1e-5, atol=1e-5)


def test_unit_vectors_gradcheck():
    x = randn(2, 3, 4, dtype=torch.float64).requires_grad_(True)
    assert torch.autograd.gradcheck(lambda v: unit_vectors(v, 2.5), (x,))


# --- matched log-softmax ---------------------------------------------------------------------


def straightforward_matched_log_softmax(queries, keys, target, weight, key_mask=None):
    scores = queries @ keys.transpose(1, 2)
    if key_mask is not None:
        scores = scores.masked_fill(~key_mask[:, None, :], float("-inf"))
    log_probs = F.log_softmax(scores, dim=-1).gather(-1, target[..., None]).squeeze(-1)
    return -(weight * log_probs.masked_fill(weight == 0, 0.0)).sum(-1)


def matched_case(dtype=torch.float32, transposed_keys=False):
    queries, keys = randn(3, 5, 4, dtype=dtype) * 3, randn(3, 6, 4, seed=1, dtype=dtype)
    if transposed_keys:  # keys laid out (B, D, Nk) in memory, as sta_loss passes them
        keys = keys.transpose(1, 2).contiguous().transpose(1, 2)
    target = torch.tensor([[0, 1, 2, 3, 4], [5, 4, 3, 2, 1], [0, 0, 1, 1, 5]])
    weight = torch.rand(3, 5, generator=torch.Generator().manual_seed(2), dtype=dtype)
    key_mask = torch.ones(3, 6, dtype=torch.bool)
    key_mask[1, 5] = False  # row 0 of sample 1 has a masked positive: it must weigh 0
    weight[1, 0] = 0.0
    weight[2, 3] = 0.0
    return queries, keys, target, weight, key_mask


@pytest.mark.parametrize("transposed_keys", [False, True])
@pytest.mark.parametrize("with_mask", [False, True])
def test_matched_log_softmax_equals_straightforward_version(transposed_keys, with_mask):
    queries, keys, target, weight, key_mask = matched_case(transposed_keys=transposed_keys)
    key_mask = key_mask if with_mask else None
    ours, our_grads = value_and_grads(
        lambda q, k: matched_log_softmax_loss(q, k, target, weight, key_mask), queries, keys
    )
    ref, ref_grads = value_and_grads(
        lambda q, k: straightforward_matched_log_softmax(q, k, target, weight, key_mask),
        queries,
        keys,
    )
    assert torch.allclose(ours, ref, atol=1e-5)
    for ours_grad, ref_grad in zip(our_grads, ref_grads, strict=True):
        assert torch.isfinite(ours_grad).all()
        assert torch.allclose(ours_grad, ref_grad, atol=1e-5)


def test_matched_log_softmax_gradcheck():
    queries, keys, target, weight, key_mask = matched_case(torch.float64, transposed_keys=True)
    queries.requires_grad_(True)
    keys.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k: matched_log_softmax_loss(q, k, target, weight, key_mask), (queries, keys)
    )


# --- normalised grounded text vectors, in word space ----------------------------------------


def straightforward_unit_grounded_text(words, weights_t, scale):
    grounded = words.transpose(1, 2) @ weights_t  # d_m = W^T beta_m as columns, (B, d, Np)
    return scale * weights_t / torch.linalg.vector_norm(grounded, dim=1, keepdim=True)


def grounded_text_case(dtype=torch.float32):
    words = F.normalize(randn(2, 5, 8, dtype=dtype), dim=-1)
    weights_t = F.softmax(randn(2, 5, 7, seed=1, dtype=dtype) * 3, dim=1)
    weights_t[0, :, 2] = torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0], dtype=dtype)  # one word
    return words, weights_t


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_unit_grounded_text_equals_straightforward_version(scale):
    words, weights_t = grounded_text_case()
    grad_output = randn(*weights_t.shape, seed=2)
    ours, our_grads = value_and_grads(
        lambda w, x: _UnitGroundedText.apply(w, x, scale),
        words,
        weights_t,
        grad_output=grad_output,
    )
    ref, ref_grads = value_and_grads(
        lambda w, x: straightforward_unit_grounded_text(w, x, scale),
        words,
        weights_t,
        grad_output=grad_output,
    )
    assert torch.allclose(ours, ref, atol=1e-6)
    for ours_grad, ref_grad in zip(our_grads, ref_grads, strict=True):
        assert torch.allclose(ours_grad, ref_grad, atol=1e-5)


@pytest.mark.parametrize("scale", [1.0, 2.5])
def test_unit_grounded_text_gradcheck(scale):
    words, weights_t = grounded_text_case(torch.float64)
    inputs = (words.requires_grad_(True), weights_t.requires_grad_(True))
    assert torch.autograd.gradcheck(lambda w, x: _UnitGroundedText.apply(w, x, scale), inputs)


def test_padded_affinity_equals_baddbmm_and_passes_gradcheck():
    words = randn(3, 5, 4, dtype=torch.float64).requires_grad_(True)
    patches = randn(3, 7, 4, seed=1, dtype=torch.float64).requires_grad_(True)
    padding = torch.tensor([0.0, -1.0e4], dtype=torch.float64)[torch.randint(0, 2, (3, 5, 1))]
    expected = torch.baddbmm(padding, words, patches.transpose(1, 2))
    torch.testing.assert_close(_PaddedAffinity.apply(words, patches, padding), expected)
    grad = randn(3, 5, 7, seed=2, dtype=torch.float64)
    ours = torch.autograd.grad(
        _PaddedAffinity.apply(words, patches, padding), (words, patches), grad
    )
    reference = torch.autograd.grad(expected, (words, patches), grad)
    for a, b in zip(ours, reference, strict=True):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda w, p: _PaddedAffinity.apply(w, p, padding), (words, patches)
    )


def test_rows_with_weight_packs_weighted_rows_first_in_order():
    weight = torch.tensor([[0.0, 0.5, 0.0, 0.5], [0.2, 0.3, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0]])
    rows = _rows_with_weight(weight)  # as many rows as the sample with the most: 3
    assert rows.shape == (3, 3)
    assert rows[0, :2].tolist() == [1, 3] and rows[1].tolist() == [0, 1, 2]
    assert torch.equal(weight.gather(1, rows).sum(-1), weight.sum(-1))


# --- the whole loss against the per-sample loop ----------------------------------------------


@pytest.mark.parametrize("sparse", ["sparsemax", "entmax15", "topk", "softmax"])
def test_reference_maps_are_normalised_and_as_sparse_as_documented(sparse):
    weights = reference_normalise(randn(6, 30) * 5, sparse, topk=4)
    assert torch.allclose(weights.sum(-1), torch.ones(6), atol=1e-5)
    if sparse == "topk":
        assert ((weights > 0).sum(-1) == 4).all()
    if sparse == "sparsemax":
        assert torch.allclose(weights, entmax_sparsemax(randn(6, 30) * 5, dim=-1), atol=1e-6)
    if sparse == "entmax15":  # the entmax package's own bisection agrees
        expected = entmax_bisect((randn(6, 30) * 5).double(), alpha=1.5, dim=-1, n_iter=100)
        assert torch.allclose(weights, expected.float(), atol=1e-5)


@pytest.mark.parametrize("temperatures", [(0.1, 0.1), (0.05, 0.2)])  # attention, local
@pytest.mark.parametrize("sparse", ["sparsemax", "entmax15", "topk", "softmax"])
def test_sta_loss_equals_per_sample_loop(sparse, temperatures):
    temperature_attn, temperature_local = temperatures
    options = dict(
        sparse=sparse,
        topk=4,
        temperature_attn=temperature_attn,
        temperature_local=temperature_local,
    )
    words, patches = randn(5, 9, 16), randn(5, 30, 16, seed=1)
    word_mask = torch.ones(5, 9, dtype=torch.bool)
    word_mask[0, 6:] = False  # a shorter report
    word_mask[1, 2] = False  # a masked token inside a report
    word_mask[2, 3:] = False  # fewer words than topk
    word_mask[4] = False  # an empty report: left out of both means
    ours, our_grads = value_and_grads(
        lambda w, p: sta_loss(w, word_mask, p, **options), words, patches
    )
    ref, ref_grads = value_and_grads(
        lambda w, p: sta_loss_per_sample_loop(w, word_mask, p, **options),
        words,
        patches,
    )
    assert torch.allclose(ours, ref, atol=1e-5)
    for ours_grad, ref_grad in zip(our_grads, ref_grads, strict=True):
        assert torch.allclose(ours_grad, ref_grad, atol=1e-5)
    assert (our_grads[0][~word_mask] == 0).all()


@pytest.mark.parametrize("sparse", ["sparsemax", "topk", "softmax"])
def test_a_batch_where_one_report_has_one_word_is_the_per_sample_loop(sparse):
    """One report with a single word and the others empty: the mean is over that one report,
    and a single word or a single selected patch (sparsemax: the word's own patch alone)
    still carries its whole weight."""
    options = dict(sparse=sparse, topk=4, temperature_attn=0.1, temperature_local=0.1)
    words, patches = randn(3, 5, 16, seed=2), randn(3, 12, 16, seed=3)
    patches[1, 7] = words[1, 2]  # the word's own patch: cosine 1, the others about 0
    word_mask = torch.zeros(3, 5, dtype=torch.bool)
    word_mask[1, 2] = True
    ours, our_grads = value_and_grads(
        lambda w, p: sta_loss(w, word_mask, p, **options), words, patches
    )
    ref, ref_grads = value_and_grads(
        lambda w, p: sta_loss_per_sample_loop(w, word_mask, p, **options), words, patches
    )
    assert ours.item() > 0.1  # its patch term: a real loss, not an emptied one
    assert torch.allclose(ours, ref, atol=1e-5)
    for ours_grad, ref_grad in zip(our_grads, ref_grads, strict=True):
        assert torch.allclose(ours_grad, ref_grad, atol=1e-5)


def test_sta_loss_stays_float32_under_autocast():
    words, patches = randn(3, 7, 16), randn(3, 20, 16, seed=1)
    word_mask = torch.ones(3, 7, dtype=torch.bool)
    word_mask[0, 4:] = False
    plain, plain_grads = value_and_grads(lambda w, p: sta_loss(w, word_mask, p), words, patches)

    def forward_under_autocast(w, p):  # backward runs outside, as autocast recommends
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return sta_loss(w, word_mask, p)

    mixed, mixed_grads = value_and_grads(forward_under_autocast, words, patches)
    assert mixed.dtype == torch.float32 and torch.allclose(mixed, plain, atol=1e-6)
    for mixed_grad, plain_grad in zip(mixed_grads, plain_grads, strict=True):
        assert torch.allclose(mixed_grad, plain_grad, atol=1e-6)


def test_a_batch_of_empty_reports_gives_zero_and_finite_gradients():
    words, patches = randn(2, 4, 8), randn(2, 6, 8, seed=1)
    loss, grads = value_and_grads(
        lambda w, p: sta_loss(w, torch.zeros(2, 4, dtype=torch.bool), p), words, patches
    )
    assert loss == 0
    assert all(torch.isfinite(grad).all() for grad in grads)


def test_sparse_normalize_keeps_eight_by_default_and_names_the_maps_it_knows():
    scores = randn(3, 20)
    kept = (sparse_normalize(scores, "topk") > 0).sum(-1)
    assert kept.tolist() == [8, 8, 8]
    with pytest.raises(ValueError, match=r"sparse must be one of .*got 'relu'"):
        sparse_normalize(scores, "relu")
