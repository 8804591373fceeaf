import numpy as np
import pytest
import torch

from sista_core.losses import sta_loss


def make_batch(seed=0, batch=4, words=7, patches=16, dim=12):
    generator = torch.Generator().manual_seed(seed)
    word_features = torch.randn(batch, words, dim, generator=generator)
    patch_features = torch.randn(batch, patches, dim, generator=generator)
    word_mask = torch.ones(batch, words, dtype=torch.bool)
    word_mask[1, 5:] = False  # a shorter report
    word_mask[2, 0] = False  # a masked token (punctuation / XXXX) inside a report
    return word_features, word_mask, patch_features


def test_sparsemax_rows_sum_to_one_and_hold_exact_zeros():
    words, mask, patches = make_batch()
    _, attention = sta_loss(words, mask, patches, sparse="sparsemax", return_attention=True)
    real_rows = attention[mask]
    assert torch.allclose(real_rows.sum(-1), torch.ones(len(real_rows)), atol=1e-5)
    assert (real_rows == 0).float().mean() > 0.5
    assert (attention[~mask] == 0).all()


def test_softmax_gives_dense_rows():
    words, mask, patches = make_batch()
    _, attention = sta_loss(words, mask, patches, sparse="softmax", return_attention=True)
    assert (attention[mask] > 0).all()


def test_topk_keeps_exactly_k_patches_per_word():
    words, mask, patches = make_batch()
    _, attention = sta_loss(words, mask, patches, sparse="topk", topk=3, return_attention=True)
    assert ((attention[mask] > 0).sum(-1) == 3).all()


def test_topk_attention_is_a_softmax_over_the_k_largest_scores_by_hand():
    """The word-to-patch attention of ``sparse: topk`` against numpy: the kept weights are
    renormalised to sum to 1, not the full softmax's values cut to k entries."""
    words, word_mask, patches = make_batch(seed=5, batch=3, words=3, patches=10, dim=8)
    word_mask[:] = True
    options = dict(sparse="topk", topk=3, temperature_attn=0.5, return_attention=True)
    _, attention = sta_loss(words, word_mask, patches, **options)
    w = words.numpy() / np.linalg.norm(words.numpy(), axis=-1, keepdims=True)
    p = patches.numpy() / np.linalg.norm(patches.numpy(), axis=-1, keepdims=True)
    expected = np.zeros((3, 3, 10))
    for i in range(3):
        for k in range(3):
            scores = w[i, k] @ p[i].T / 0.5
            top = np.argsort(scores)[-3:]
            expected[i, k, top] = np.exp(scores[top]) / np.exp(scores[top]).sum()
    np.testing.assert_allclose(attention.numpy(), expected, atol=1e-6)


def test_entmax15_is_sparse_and_normalised():
    words, mask, patches = make_batch()
    _, attention = sta_loss(words, mask, patches, sparse="entmax15", return_attention=True)
    assert torch.allclose(attention[mask].sum(-1), torch.ones(int(mask.sum())), atol=1e-5)
    assert (attention[mask] == 0).any()


@pytest.mark.parametrize("sparse", ["sparsemax", "entmax15", "topk", "softmax"])
def test_padded_words_do_not_change_the_loss(sparse):
    words, mask, patches = make_batch()
    padding = torch.randn(words.shape[0], 5, words.shape[2]) * 100  # garbage in the padding
    padded_words = torch.cat([words, padding], dim=1)
    padded_mask = torch.cat([mask, torch.zeros(mask.shape[0], 5, dtype=torch.bool)], dim=1)
    original = sta_loss(words, mask, patches, sparse=sparse)
    padded = sta_loss(padded_words, padded_mask, patches, sparse=sparse)
    assert torch.allclose(original, padded, atol=1e-6)


@pytest.mark.parametrize("sparse", ["sparsemax", "softmax"])
def test_shuffling_the_batch_leaves_the_loss_unchanged(sparse):
    words, mask, patches = make_batch()
    order = torch.tensor([2, 0, 3, 1])
    original = sta_loss(words, mask, patches, sparse=sparse)
    shuffled = sta_loss(words[order], mask[order], patches[order], sparse=sparse)
    assert torch.allclose(original, shuffled, atol=1e-6)


def test_gradients_reach_words_and_patches():
    words, mask, patches = make_batch()
    words.requires_grad_(True)
    patches.requires_grad_(True)
    sta_loss(words, mask, patches).backward()
    assert words.grad[mask].abs().sum() > 0
    assert patches.grad.abs().sum() > 0
    assert (words.grad[~mask] == 0).all()


def test_a_report_without_words_is_left_out_of_the_mean():
    words, mask, patches = make_batch()
    empty_mask = mask.clone()
    empty_mask[3] = False
    words.requires_grad_(True)
    with_empty = sta_loss(words, empty_mask, patches)
    without = sta_loss(words[:3], empty_mask[:3], patches[:3])
    assert torch.allclose(with_empty, without, atol=1e-6)
    with_empty.backward()
    assert torch.isfinite(words.grad).all()


def test_aligned_pairs_score_lower_than_misaligned():
    # Each word equals one patch of its own image: sparse attention finds it exactly.
    generator = torch.Generator().manual_seed(3)
    patches = torch.randn(4, 16, 12, generator=generator)
    words = patches[:, :6].clone()
    mask = torch.ones(4, 6, dtype=torch.bool)
    aligned = sta_loss(words, mask, patches)
    misaligned = sta_loss(words, mask, patches[[1, 2, 3, 0]])
    assert aligned < misaligned


def test_unknown_sparse_kind_is_an_error():
    with pytest.raises(ValueError, match="sparse"):
        sta_loss(*make_batch(), sparse="sparsmax")


def test_the_module_passes_its_options_and_counts_attended_patches_per_real_word():
    from sista_core.losses import STALoss

    words, mask, patches = make_batch(seed=3)
    module = STALoss(temperature_attn=0.2, temperature_local=0.5, sparse="topk", topk=3)
    found = module(words, mask, patches)
    loss, attention = sta_loss(
        words,
        mask,
        patches,
        temperature_attn=0.2,
        temperature_local=0.5,
        sparse="topk",
        topk=3,
        return_attention=True,
    )
    assert torch.equal(found["loss"], loss) and torch.equal(found["attention"], attention)
    # top-3: every real word attends to exactly 3 patches; counted by hand over real words
    counts = [int((attention[b, w] > 0).sum()) for b, w in mask.nonzero().tolist()]
    assert counts == [3] * int(mask.sum())
    assert found["attention_nonzero_per_word"].item() == 3.0
    sparse = STALoss(sparse="sparsemax")(words, mask, patches)
    by_hand = np.mean([int((sparse["attention"][b, w] > 0).sum()) for b, w in mask.nonzero()])
    assert sparse["attention_nonzero_per_word"].item() == pytest.approx(by_hand)
    assert 1 <= by_hand < patches.shape[1]  # sparse, yet never empty
    for kind in ("sparsemax", "topk"):  # the module's defaults are the function's
        default = STALoss(sparse=kind)(words, mask, patches)["loss"]
        assert torch.equal(default, sta_loss(words, mask, patches, sparse=kind))
    no_words = STALoss()(words, torch.zeros_like(mask), patches)
    assert no_words["attention_nonzero_per_word"].item() == 0.0
    with pytest.raises(ValueError, match="sparse must be one of"):
        STALoss(sparse="dense")
