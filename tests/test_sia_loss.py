import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sista_core.losses import IntraLoss, SIALoss, false_negative_mask, intra_loss, sia_loss
from sista_core.losses.distributed import (
    distributed_world,
    gather_no_grad,
    gather_with_grad,
    mean_over_workers,
)


def independent_symmetric_infonce(img, txt, temperature):
    """CLIP's loss, written out row by row without the library."""
    img = img / img.norm(dim=-1, keepdim=True)
    txt = txt / txt.norm(dim=-1, keepdim=True)
    logits = img @ txt.T / temperature
    n = logits.shape[0]
    i2t = sum(-(logits[i, i] - torch.logsumexp(logits[i], 0)) for i in range(n)) / n
    t2i = sum(-(logits[i, i] - torch.logsumexp(logits[:, i], 0)) for i in range(n)) / n
    return (i2t + t2i) / 2


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(0)
    img = torch.randn(6, 16, generator=generator)
    txt = img + 0.5 * torch.randn(6, 16, generator=generator)
    semantics = torch.randn(6, 8, generator=generator)
    semantics[1] = semantics[0] + 0.01  # reports 0 and 1 say the same thing
    s = F.normalize(semantics, dim=-1)
    return img, txt, s @ s.T


def test_mode_none_equals_independent_infonce(batch):
    img, txt, report_sim = batch
    expected = independent_symmetric_infonce(img, txt, 0.07)
    actual = sia_loss(img, txt, report_sim, mode="none", temperature=0.07)
    assert torch.allclose(actual, expected, atol=1e-5)


def test_eliminate_on_hand_built_4x4_equals_hand_computed_value():
    # Orthonormal embeddings: z_ii = 1/tau, z_ij = 0. Reports 0 and 1 are false negatives.
    img = txt = torch.eye(4)
    report_sim = torch.tensor(
        [[1.0, 0.95, 0.1, 0.0], [0.95, 1.0, 0.2, 0.1], [0.1, 0.2, 1.0, 0.3], [0.0, 0.1, 0.3, 1.0]]
    )
    # tau = 1: rows 0 and 1 keep two negatives, rows 2 and 3 keep three, in both directions.
    row_with_eliminated = -math.log(math.e / (math.e + 2))
    row_full = -math.log(math.e / (math.e + 3))
    by_hand = (2 * row_with_eliminated + 2 * row_full) / 4
    actual = sia_loss(img, txt, report_sim, temperature=1.0, threshold=0.9, mode="eliminate")
    assert actual.item() == pytest.approx(by_hand, abs=1e-6)


@pytest.mark.parametrize("mode", ["eliminate", "positive", "soft"])
def test_threshold_above_one_equals_plain_infonce(batch, mode):
    img, txt, report_sim = batch
    plain = sia_loss(img, txt, report_sim, mode="none")
    assert torch.allclose(sia_loss(img, txt, report_sim, mode=mode, threshold=1.01), plain)


def test_eliminated_false_negative_lowers_row_loss():
    generator = torch.Generator().manual_seed(1)
    img = torch.randn(5, 8, generator=generator)
    txt = torch.randn(5, 8, generator=generator)
    txt[1] = img[0]  # report 1 matches image 0 strongly: a harmful negative for row 0
    report_sim = torch.eye(5)

    def row0_loss(sim):
        # Row 0's image-to-text term only: a one-row batch view of the same logits.
        logits = F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).T / 0.07
        eliminated = false_negative_mask(sim, 0.9)
        return -F.log_softmax(logits[0].masked_fill(eliminated[0], float("-inf")), 0)[0]

    flagged = report_sim.clone()
    flagged[0, 1] = flagged[1, 0] = 0.95
    assert row0_loss(flagged) < row0_loss(report_sim)
    # and the full loss falls too
    before = sia_loss(img, txt, report_sim, mode="eliminate")
    after = sia_loss(img, txt, flagged, mode="eliminate")
    assert after < before


def test_positive_mode_counts_false_negatives_as_positives():
    img = txt = torch.eye(3)
    report_sim = torch.tensor([[1.0, 0.95, 0.0], [0.95, 1.0, 0.0], [0.0, 0.0, 1.0]])
    # Rows 0, 1: mean of -log p over positives {self, other}; row 2: plain.
    p_self = math.e / (math.e + 2)
    p_other = 1 / (math.e + 2)
    rows_01 = (-math.log(p_self) - math.log(p_other)) / 2
    by_hand = (2 * rows_01 - math.log(p_self)) / 3
    actual = sia_loss(img, txt, report_sim, temperature=1.0, threshold=0.9, mode="positive")
    assert actual.item() == pytest.approx(by_hand, abs=1e-6)


def numpy_log_softmax_rows(x):
    x = x - x.max(1, keepdims=True)
    return x - np.log(np.exp(x).sum(1, keepdims=True))


@pytest.mark.parametrize("mode", ["eliminate", "positive"])
def test_a_chain_of_similar_reports_is_handled_pair_by_pair(mode):
    """Similarity is not transitive: 0 ~ 1 and 1 ~ 2 but not 0 ~ 2, so report 1 has two false
    negatives and reports 0 and 2 one each. Rows and columns then differ, which a loss that
    summed or normalised along the wrong axis would show (a symmetric clique would not).
    Written in numpy from docs/method.md, image rows and report columns, both directions."""
    generator = torch.Generator().manual_seed(2)
    img, txt = torch.randn(5, 6, generator=generator), torch.randn(5, 6, generator=generator)
    report_sim = torch.eye(5)
    report_sim[0, 1] = report_sim[1, 0] = report_sim[1, 2] = report_sim[2, 1] = 0.95
    report_sim[0, 2] = report_sim[2, 0] = 0.5
    unit = lambda x: x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)  # noqa: E731
    logits = unit(img) @ unit(txt).T / 0.1
    flagged = (report_sim.numpy() >= 0.9) & ~np.eye(5, dtype=bool)

    def direction(scores, flags):
        if mode == "eliminate":  # false negatives leave the denominator
            kept = np.where(flags, -np.inf, scores)
            return -np.mean([numpy_log_softmax_rows(kept)[i, i] for i in range(5)])
        log_p = numpy_log_softmax_rows(scores)  # positives: self and the false negatives
        own = [[i, *np.flatnonzero(flags[i])] for i in range(5)]
        return np.mean([-np.mean(log_p[i, own[i]]) for i in range(5)])

    by_hand = 0.5 * (direction(logits, flagged) + direction(logits.T, flagged.T))
    found = sia_loss(img, txt, report_sim, temperature=0.1, threshold=0.9, mode=mode)
    assert found.item() == pytest.approx(by_hand, rel=1e-5)


def test_soft_mode_with_alpha_zero_is_plain_infonce(batch):
    img, txt, report_sim = batch
    plain = sia_loss(img, txt, report_sim, mode="none")
    assert torch.allclose(sia_loss(img, txt, report_sim, mode="soft", alpha=0.0), plain)
    assert not torch.allclose(sia_loss(img, txt, report_sim, mode="soft", alpha=0.5), plain)


def test_unknown_mode_is_an_error(batch):
    with pytest.raises(ValueError, match="sia mode"):
        sia_loss(*batch, mode="elminate")


def test_intra_loss_is_zero_when_image_structure_matches_reports():
    # Two clusters in the images, the same two clusters in the reports, sharpnesses matched.
    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    report_sim = F.normalize(img, dim=-1) @ F.normalize(img, dim=-1).T
    matched = intra_loss(img, report_sim, temperature=0.1, sigma=0.1)
    assert matched.item() == pytest.approx(0.0, abs=1e-6)
    shuffled = intra_loss(img[[0, 2, 1, 3]], report_sim, temperature=0.1, sigma=0.1)
    assert shuffled > 0.1


def test_sia_loss_gradients_reach_both_modalities(batch):
    img, txt, report_sim = batch
    img.requires_grad_(True)
    txt.requires_grad_(True)
    sia_loss(img, txt, report_sim).backward()
    assert img.grad.abs().sum() > 0 and txt.grad.abs().sum() > 0


def _semantics_near_threshold(size: int, threshold: float) -> torch.Tensor:
    """Report vectors whose pairwise cosine similarities spread over threshold ± 0.005."""
    generator = torch.Generator().manual_seed(0)
    cosine = threshold - 0.005 + 0.01 * torch.rand(size, generator=generator)
    shared = torch.zeros(size, size + 1)
    shared[:, 0] = 1.0
    own = torch.eye(size + 1)[1:] * (1 / cosine - 1).sqrt()[:, None]
    return shared + own  # cos(i, j) = sqrt(cosine_i * cosine_j)


def test_sia_and_intra_under_bfloat16_autocast_equal_float32():
    semantics = _semantics_near_threshold(64, 0.9)
    similarity = F.normalize(semantics, dim=-1)
    off_diagonal = ~torch.eye(64, dtype=torch.bool)
    near = ((similarity @ similarity.T)[off_diagonal] - 0.9).abs() < 0.005
    assert near.float().mean() > 0.9  # the test is about pairs at the threshold
    generator = torch.Generator().manual_seed(1)
    img, txt = torch.randn(64, 16, generator=generator), torch.randn(64, 16, generator=generator)
    sia, intra = SIALoss(threshold=0.9, temperature=0.07), IntraLoss(temperature=0.2, sigma=0.1)
    full = sia(img, txt, semantics), intra(img, semantics)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = sia(img, txt, semantics), intra(img, semantics)
    assert 0.2 < full[0]["fraction_eliminated"] < 0.8
    assert mixed[0]["fraction_eliminated"] == full[0]["fraction_eliminated"]
    assert mixed[0]["loss"].dtype == torch.float32
    assert torch.allclose(mixed[0]["loss"], full[0]["loss"], atol=1e-6)
    assert torch.allclose(mixed[1], full[1], atol=1e-6)


# --- soft mode and the intra-modal term against numpy, written from docs/method.md ---------


def numpy_softmax(x):
    e = np.exp(x - x.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def numpy_cosine(a, b):
    a = a / np.linalg.norm(a, axis=-1, keepdims=True)
    b = b / np.linalg.norm(b, axis=-1, keepdims=True)
    return a @ b.T


@pytest.fixture
def uneven_batch():
    """Images and reports that are not each other's copies (z != z^T), and report
    similarities with no structure shared with the images."""
    rng = np.random.default_rng(7)
    img, txt, semantics = rng.normal(size=(5, 6)), rng.normal(size=(5, 6)), rng.normal(size=(5, 4))
    return img, txt, numpy_cosine(semantics, semantics)


def test_soft_mode_equals_the_equations_by_hand(uneven_batch):
    img, txt, r = uneven_batch
    tau, sigma, alpha = 0.2, 0.05, 0.3
    z = numpy_cosine(img, txt) / tau
    # Anchor i's target, image or report: (1 - alpha) onehot(i) + alpha softmax_j(R_ij / sigma).
    targets = (1 - alpha) * np.eye(5) + alpha * numpy_softmax(r / sigma)
    image_to_text = -(targets * np.log(numpy_softmax(z))).sum(1).mean()
    text_to_image = -(targets * np.log(numpy_softmax(z.T))).sum(1).mean()
    by_hand = (image_to_text + text_to_image) / 2
    actual = sia_loss(
        *(torch.from_numpy(x).float() for x in (img, txt, r)),
        mode="soft",
        temperature=tau,
        sigma=sigma,
        alpha=alpha,
    )
    assert actual.item() == pytest.approx(by_hand, rel=1e-5)


def numpy_intra(img, r, tau, sigma, reverse=False):
    """Mean over i of KL(softmax_{j!=i}(R_ij / sigma) || softmax_{j!=i}(cos(u_i, u_j) / tau)),
    or with ``reverse`` the KL the other way round."""
    cos, rows = numpy_cosine(img, img), []
    for i in range(len(img)):
        others = [j for j in range(len(img)) if j != i]
        p = numpy_softmax(r[i, others] / sigma)  # the reports' distribution: the target
        q = numpy_softmax(cos[i, others] / tau)
        p, q = (q, p) if reverse else (p, q)
        rows.append((p * np.log(p / q)).sum())
    return float(np.mean(rows))


def test_intra_loss_equals_the_kl_by_hand_in_its_direction(uneven_batch):
    img, _, r = uneven_batch
    tau, sigma = 0.2, 0.05
    by_hand = numpy_intra(img, r, tau, sigma)
    # The case tells the two directions of the KL, and the two temperatures, apart.
    assert abs(numpy_intra(img, r, tau, sigma, reverse=True) - by_hand) > 0.05
    assert abs(numpy_intra(img, r, sigma, tau) - by_hand) > 0.05
    actual = intra_loss(
        torch.from_numpy(img).float(), torch.from_numpy(r).float(), temperature=tau, sigma=sigma
    )
    assert actual.item() == pytest.approx(by_hand, rel=1e-5)
    # docs/method.md's defaults: tau = 0.07, sigma = 0.1
    default = intra_loss(torch.from_numpy(img).float(), torch.from_numpy(r).float())
    assert default.item() == pytest.approx(numpy_intra(img, r, 0.07, 0.1), rel=1e-4)


def test_the_intra_term_of_a_single_image_is_zero_with_a_gradient():
    img = torch.randn(1, 4, requires_grad=True)
    loss = intra_loss(img, torch.ones(1, 1))
    assert loss.item() == 0.0
    loss.backward()
    assert torch.equal(img.grad, torch.zeros(1, 4))


@pytest.mark.parametrize("mode", ["eliminate", "positive", "soft", "none"])
def test_the_modules_pass_their_options_and_report_the_share_of_flagged_pairs(mode):
    """SIALoss and IntraLoss in one process: the functional losses (checked against the
    equations above) with the module's options, on report similarities computed here in
    numpy; the share of off-diagonal pairs at or above the threshold counted by hand."""
    generator = torch.Generator().manual_seed(5)
    img, txt = torch.randn(6, 8, generator=generator), torch.randn(6, 8, generator=generator)
    semantics = torch.randn(6, 4, generator=generator)
    semantics[3] = 2 * semantics[0]  # one pair of reports that say the same thing
    semantics[5] = semantics[1] + 0.05 * semantics[2]  # and a near one
    unit = semantics.numpy() / np.linalg.norm(semantics.numpy(), axis=1, keepdims=True)
    cosine = torch.from_numpy(unit @ unit.T)
    options = {"temperature": 0.2, "sigma": 0.4}
    sia = SIALoss(threshold=0.95, mode=mode, alpha=0.3, gather_distributed=False, **options)
    found = sia(img, txt, semantics)
    expected = sia_loss(img, txt, cosine, threshold=0.95, mode=mode, alpha=0.3, **options)
    assert torch.allclose(found["loss"], expected, atol=1e-6)
    flagged = sum(cosine[i, j] >= 0.95 for i in range(6) for j in range(6) if i != j)
    assert flagged == 4  # (0, 3), (1, 5) and their transposes
    share = 0.0 if mode == "none" else 4 / 30
    assert found["fraction_eliminated"].item() == pytest.approx(share)
    intra = IntraLoss(gather_distributed=False, **options)(img, semantics)
    assert torch.allclose(intra, intra_loss(img, cosine, **options), atol=1e-6)
    # The modules' defaults are the functions' (docs/method.md's values).
    default = SIALoss(mode=mode, gather_distributed=False)(img, txt, semantics)["loss"]
    assert torch.allclose(default, sia_loss(img, txt, cosine, mode=mode), atol=1e-6)
    intra_default = IntraLoss(gather_distributed=False)(img, semantics)
    assert torch.allclose(intra_default, intra_loss(img, cosine), atol=1e-6)
    with pytest.raises(ValueError, match="sia mode must be one of"):
        SIALoss(mode="drop")


def test_nothing_is_flagged_above_a_threshold_of_one_or_in_a_batch_of_one():
    img, semantics = torch.randn(4, 8), torch.ones(4, 3)  # every pair says the same thing
    assert SIALoss(threshold=0.99)(img, img, semantics)["fraction_eliminated"].item() == 1.0
    assert SIALoss(threshold=1.01)(img, img, semantics)["fraction_eliminated"].item() == 0.0
    one = SIALoss(threshold=0.5)(img[:1], img[:1], semantics[:1])["fraction_eliminated"]
    assert one.item() == 0.0


# --- the gather that puts SIA and the intra term over the global batch, in one process ----
# (tests/test_distributed.py runs it with real gloo workers; mutmut cannot see into those)


def test_gathering_is_the_identity_without_distributed():
    x = torch.randn(3, 4, requires_grad=True)
    assert gather_with_grad(x) is x and mean_over_workers(x) is x
    assert distributed_world() == (0, 1)
    kept = gather_no_grad(x)
    assert torch.equal(kept, x) and not kept.requires_grad


@pytest.fixture
def rank_1_of_3(monkeypatch):
    """This process as worker 1 of 3, in process: the collectives fill in the other workers'
    tensors (known to the test), so the gather's code runs where its statistics are kept."""
    import sista_core.losses.distributed as distributed

    others = {0: torch.randn(2, 4), 2: torch.randn(2, 4)}

    def all_gather(shards, x):
        assert x.is_contiguous() and len(shards) == 3
        for rank, shard in enumerate(shards):
            shard.copy_(x if rank == 1 else others[rank])

    def all_reduce(x):  # sum over workers, in place: the others hold 2x and 3x this value
        x.mul_(1 + 2 + 3)

    monkeypatch.setattr(distributed, "distributed_world", lambda: (1, 3))
    monkeypatch.setattr(distributed.dist, "all_gather", all_gather)
    monkeypatch.setattr(distributed.dist, "all_reduce", all_reduce)
    return others


def test_the_gather_backward_gives_the_shard_world_size_times_its_global_gradient(rank_1_of_3):
    local = torch.randn(2, 4).t().contiguous().t().requires_grad_()  # a non-contiguous view
    gathered = gather_with_grad(local)
    expected = torch.cat([rank_1_of_3[0], local.detach(), rank_1_of_3[2]])
    assert torch.equal(gathered, expected)
    weights = torch.randn(6, 4)
    (gathered * weights).sum().backward()
    # d/d local of the global loss is weights[2:4]; the three workers' identical losses each
    # contribute it, and the backward returns the sum without a collective: 3x.
    assert torch.allclose(local.grad, 3 * weights[2:4])


def test_gathering_without_gradient_and_the_logged_mean(rank_1_of_3):
    local = torch.randn(2, 4, requires_grad=True)
    gathered = gather_no_grad(local)
    assert torch.equal(gathered, torch.cat([rank_1_of_3[0], local.detach(), rank_1_of_3[2]]))
    assert not gathered.requires_grad
    loss = torch.tensor(1.5, requires_grad=True)
    logged = mean_over_workers(loss)
    assert logged.item() == pytest.approx((1.5 + 3.0 + 4.5) / 3)  # workers 1.5, 3.0, 4.5
    assert loss.item() == 1.5 and not logged.requires_grad  # the loss itself is left alone


def test_the_modules_gather_the_global_batch_unless_told_not_to(rank_1_of_3):
    generator = torch.Generator().manual_seed(7)
    img, txt, semantics = (torch.randn(2, 4, generator=generator) for _ in range(3))

    def gathered(local):  # the other workers' rows around this worker's, in rank order
        return torch.cat([rank_1_of_3[0], local, rank_1_of_3[2]])

    def cosine(x):
        unit = x.numpy() / np.linalg.norm(x.numpy(), axis=1, keepdims=True)
        return torch.from_numpy(unit @ unit.T)

    sem = gathered(semantics)
    found = SIALoss(threshold=0.5)(img, txt, semantics)["loss"]
    expected = sia_loss(gathered(img), gathered(txt), cosine(sem), threshold=0.5)
    assert torch.allclose(found, expected, atol=1e-6)
    assert torch.allclose(IntraLoss()(img, semantics), intra_loss(gathered(img), cosine(sem)))
    alone = SIALoss(threshold=0.5, gather_distributed=False)(img, txt, semantics)["loss"]
    assert torch.allclose(alone, sia_loss(img, txt, cosine(semantics), threshold=0.5))
    intra_alone = IntraLoss(gather_distributed=False)(img, semantics)
    assert torch.allclose(intra_alone, intra_loss(img, cosine(semantics)))


def test_a_pair_exactly_at_the_threshold_is_a_false_negative():
    report_sim = torch.tensor([[1.0, 0.9, 0.5], [0.9, 1.0, 0.899], [0.5, 0.899, 1.0]])
    flagged = false_negative_mask(report_sim, 0.9)  # R_ij >= threshold, j != i
    assert flagged.tolist() == [[False, True, False], [True, False, False], [False] * 3]


def test_the_intra_term_of_one_dimensional_embeddings_is_still_the_kl(uneven_batch):
    img, _, r = uneven_batch
    line = img[:, :1]  # one coordinate: cosines of +-1
    by_hand = numpy_intra(line, r, 0.2, 0.05)
    line_t, r_t = torch.from_numpy(line).float(), torch.from_numpy(r).float()
    found = intra_loss(line_t, r_t, temperature=0.2, sigma=0.05)
    assert found.item() == pytest.approx(by_hand, rel=1e-5)


def test_a_threshold_of_exactly_one_still_flags_reports_that_say_the_same_thing(batch):
    """Only a threshold above 1 switches SIA off; at 1, a similarity of exactly 1 is flagged."""
    img, txt, _ = batch
    report_sim = torch.eye(6)
    report_sim[0, 1] = report_sim[1, 0] = 1.0  # reports 0 and 1 identical
    flagged = sia_loss(img, txt, report_sim, threshold=1.0, mode="eliminate")
    above = sia_loss(img, txt, report_sim, threshold=1.0 + 1e-6, mode="eliminate")
    assert torch.allclose(above, independent_symmetric_infonce(img, txt, 0.07), atol=1e-5)
    assert flagged < above - 5e-5  # one negative fewer in rows 0 and 1


@pytest.mark.parametrize("mode", ["none", "eliminate", "positive", "soft"])
def test_every_tensor_sia_makes_is_on_its_inputs_device(mode):
    """On the meta device (no data) a tensor made on the default device, the CPU, meets the
    embeddings' and torch refuses the mix: what a CUDA batch would hit. The report
    similarities may come from anywhere (the CPU's similarity cache): SIA moves them."""
    img, txt = torch.randn(4, 8, device="meta"), torch.randn(4, 8, device="meta")
    report_sim = torch.rand(4, 4, dtype=torch.float64)
    loss = sia_loss(img, txt, report_sim, mode=mode, threshold=0.5)
    assert loss.device.type == "meta" and loss.shape == ()


def test_eliminate_equals_the_row_by_row_reference():
    """The vectorised loss and its gradients against docs/method.md written one row at a time
    (sista_core.losses.reference): reports alike enough to be eliminated, and some not."""
    import torch.nn.functional as F

    from sista_core.losses import sia_loss
    from sista_core.losses.reference import sia_loss_per_row_loop

    generator = torch.Generator().manual_seed(0)
    img = torch.randn(12, 8, generator=generator, requires_grad=True)
    txt = torch.randn(12, 8, generator=generator, requires_grad=True)
    semantics = F.normalize(torch.randn(12, 4, generator=generator), dim=-1)
    semantics[3:6] = semantics[2]  # reports 2-5 say the same thing
    report_sim = semantics @ semantics.T
    ours = sia_loss(img, txt, report_sim, threshold=0.9)
    reference = sia_loss_per_row_loop(img, txt, report_sim, threshold=0.9)
    assert torch.allclose(ours, reference, atol=1e-5)
    for mine, theirs in zip(
        torch.autograd.grad(ours, (img, txt)),
        torch.autograd.grad(reference, (img, txt)),
        strict=True,
    ):
        assert torch.allclose(mine, theirs, atol=1e-5)
