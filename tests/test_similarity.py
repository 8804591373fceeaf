import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from sista_core.similarity import (
    add_neighbours,
    duplicate_groups,
    sample_batches,
    similarity_statistics,
    topk_neighbours,
)

NUM_REPORTS, DIM = 2000, 384


@pytest.fixture(scope="module")
def report_embeddings() -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return F.normalize(torch.randn(NUM_REPORTS, DIM, generator=generator), dim=-1)


def brute_force_topk(embeddings: torch.Tensor, k: int, exclude_self: bool):
    """The full N x N matrix and torch.topk: the definition the block-wise code must meet."""
    s = F.normalize(embeddings.float(), dim=-1)
    report_sim = s @ s.T
    if exclude_self:
        report_sim.fill_diagonal_(float("-inf"))
    return report_sim, report_sim.topk(k + 1, dim=1)


def assert_matches_brute_force(embeddings, indices, similarity, k, exclude_self):
    report_sim, (ref_sim, ref_index) = brute_force_topk(embeddings, k, exclude_self)
    assert indices.shape == similarity.shape == (embeddings.shape[0], k)
    assert indices.dtype == torch.int64 and similarity.dtype == torch.float32
    torch.testing.assert_close(similarity, ref_sim[:, :k], atol=1e-5, rtol=0)
    # Each returned index really has the returned similarity.
    torch.testing.assert_close(report_sim.gather(1, indices), similarity, atol=1e-5, rtol=0)
    # Where a reference value is distinct from its neighbours in rank, the index must agree.
    gap_before = torch.cat([torch.full_like(ref_sim[:, :1], math.inf), -ref_sim.diff(dim=1)], 1)
    gap_after = -ref_sim.diff(dim=1)
    distinct = (gap_before[:, :k] > 1e-5) & (gap_after > 1e-5)
    assert distinct.float().mean() > 0.9
    assert torch.equal(indices[distinct], ref_index[:, :k][distinct])
    if exclude_self:
        assert not (indices == torch.arange(len(indices))[:, None]).any()


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("exclude_self", [True, False])
@pytest.mark.parametrize("block_size", [333, 768])
@pytest.mark.parametrize("k", [1, 32])
def test_float16_topk_equals_brute_force(report_embeddings, k, block_size, exclude_self, symmetric):
    embeddings = report_embeddings.half()  # the cache stores float16
    indices, similarity = topk_neighbours(
        embeddings, k, block_size=block_size, exclude_self=exclude_self, symmetric=symmetric
    )
    assert_matches_brute_force(embeddings, indices, similarity, k, exclude_self)


def test_float32_topk_equals_brute_force(report_embeddings):
    indices, similarity = topk_neighbours(report_embeddings, 32, block_size=999)
    assert_matches_brute_force(report_embeddings, indices, similarity, 32, exclude_self=True)


def test_topk_with_one_block_and_tiny_blocks_equal_brute_force(report_embeddings):
    embeddings = report_embeddings[:50]
    for block_size in (1, 7, 4096):
        indices, similarity = topk_neighbours(embeddings, 8, block_size=block_size)
        assert_matches_brute_force(embeddings, indices, similarity, 8, exclude_self=True)


def corpus_with_identical_reports() -> tuple[torch.Tensor, list[int]]:
    """30 reports; 8 scattered ones are the same report (R = 1 exactly among them)."""
    generator = torch.Generator().manual_seed(1)
    embeddings = F.normalize(torch.randn(30, 32, generator=generator), dim=-1)
    identical = [3, 4, 11, 17, 20, 21, 25, 29]
    normal_report = torch.zeros(32)
    normal_report[:4] = 0.5  # unit norm; dot products of copies are exactly 1
    embeddings[identical] = normal_report
    return embeddings, identical


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("block_size", [1, 2, 5, 8, 64])  # 64: one block
def test_ties_go_to_the_lowest_index_whatever_the_blocks(block_size, symmetric):
    embeddings, identical = corpus_with_identical_reports()
    indices, similarity = topk_neighbours(embeddings, 3, block_size=block_size, symmetric=symmetric)
    for report in identical:
        others = [j for j in identical if j != report]
        assert indices[report].tolist() == others[:3]
        assert similarity[report].tolist() == [1.0, 1.0, 1.0]


def lists_before(embeddings: torch.Tensor, new_rows: torch.Tensor, k: int, block_size: int):
    """The (N, k) lists of an earlier cache that held every row but ``new_rows``."""
    old_rows = torch.tensor([i for i in range(len(embeddings)) if i not in set(new_rows.tolist())])
    old_index, old_sim = topk_neighbours(embeddings[old_rows], k, block_size=block_size)
    indices = torch.full((len(embeddings), k), -1)
    similarity = torch.full((len(embeddings), k), float("-inf"))
    indices[old_rows], similarity[old_rows] = old_rows[old_index], old_sim
    return indices, similarity


@pytest.mark.parametrize("new_count", [1, 150, 1200])
@pytest.mark.parametrize("block_size", [97, 4096])
def test_added_reports_give_the_top_k_of_the_whole_set(report_embeddings, new_count, block_size):
    embeddings = report_embeddings.half()
    generator = torch.Generator().manual_seed(new_count)
    new_rows = torch.randperm(NUM_REPORTS, generator=generator)[:new_count]
    before = lists_before(embeddings, new_rows, 16, block_size=300)
    indices, similarity = add_neighbours(embeddings, *before, new_rows, block_size=block_size)
    assert_matches_brute_force(embeddings, indices, similarity, 16, exclude_self=True)
    # the old rows' lists are kept where no new report entered them
    untouched = ~torch.isin(indices, new_rows).any(1)
    untouched[new_rows] = False
    assert untouched.any() or new_count == 1200
    assert torch.equal(indices[untouched], before[0][untouched])


def test_added_identical_reports_tie_to_the_lowest_index():
    embeddings, identical = corpus_with_identical_reports()
    new_rows = torch.tensor([4, 20, 29])  # three copies arrive later
    before = lists_before(embeddings, new_rows, 3, block_size=7)
    indices, similarity = add_neighbours(embeddings, *before, new_rows, block_size=5)
    for report in identical:
        assert indices[report].tolist() == [j for j in identical if j != report][:3]
        assert similarity[report].tolist() == [1.0, 1.0, 1.0]


def test_progress_reports_rows_done_up_to_n(report_embeddings):
    seen: list[int] = []
    topk_neighbours(report_embeddings[:1000], 4, block_size=300, progress=seen.append)
    assert seen == [300, 600, 900, 1000]


def test_invalid_k_and_non_finite_embeddings_are_errors(report_embeddings):
    with pytest.raises(ValueError, match="k=10"):
        topk_neighbours(report_embeddings[:10], 10)
    assert topk_neighbours(report_embeddings[:10], 10, exclude_self=False)[0].shape == (10, 10)
    broken = report_embeddings[:10].clone()
    broken[4, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        topk_neighbours(broken, 2)


def test_duplicate_groups_are_named_by_their_smallest_member():
    embeddings, identical = corpus_with_identical_reports()
    embeddings[[8, 14, 27]] = embeddings[5].clone()  # a second group, led by report 5
    indices, similarity = topk_neighbours(embeddings, 3, block_size=16)
    group = duplicate_groups(indices, similarity, threshold=0.999)
    expected = torch.arange(30)
    expected[identical] = identical[0]
    expected[[5, 8, 14, 27]] = 5
    assert torch.equal(group, expected)


def hand_made_corpus() -> torch.Tensor:
    """7 reports whose 21 pairs have known R: 4 at 1.0, 3 at 0.96, 2 at 0.65, 12 at 0.0."""
    e = torch.eye(8)
    copies_a = [e[0]] * 3  # 3 pairs at 1.0
    copies_b = [e[1]] * 2  # 1 pair at 1.0
    near_a = 0.96 * e[0] + 0.28 * e[2]  # 3 pairs at 0.96 with the copies of a
    loosely_b = 0.65 * e[1] + math.sqrt(1 - 0.65**2) * e[3]  # 2 pairs at 0.65
    return torch.stack([*copies_a, *copies_b, near_a, loosely_b])


@pytest.mark.parametrize("block_size", [2, 3, 4096])
def test_exact_statistics_on_hand_made_corpus(block_size):
    stats = similarity_statistics(
        hand_made_corpus(), bins=25, batch_size=7, num_batches=3, block_size=block_size
    )
    assert stats["method"] == "exact" and stats["pairs"] == 21
    assert stats["fraction_at_least"] == {
        "0.8": 7 / 21,
        "0.85": 7 / 21,
        "0.9": 7 / 21,
        "0.95": 7 / 21,
        "0.98": 4 / 21,
    }
    # 25 bins of width 0.08 over [-1, 1]: 0.0 in bin 12, 0.65 in bin 20, 0.96 and 1.0 in 24.
    expected_histogram = [0] * 25
    expected_histogram[12], expected_histogram[20], expected_histogram[24] = 12, 2, 7
    assert stats["histogram"] == expected_histogram
    # A batch of all 7 reports is the whole corpus: same fractions, no spread.
    assert stats["batch"]["0.98"]["pair_fraction_mean"] == pytest.approx(4 / 21)
    assert stats["batch"]["0.98"]["pair_fraction_std"] == 0.0
    assert stats["batch"]["0.98"]["per_anchor_mean"] == pytest.approx(4 / 21 * 6)
    assert stats["batch"]["0.98"]["anchors_with_any_mean"] == pytest.approx(5 / 7)


def test_sampled_statistics_estimate_the_exact_fractions():
    stats = similarity_statistics(
        hand_made_corpus(), bins=25, batch_size=7, exact_limit=0, num_pairs=200_000, seed=3
    )
    assert stats["method"].startswith("sampled") and stats["pairs"] == 200_000
    assert stats["fraction_at_least"]["0.95"] == pytest.approx(7 / 21, abs=0.005)
    assert stats["fraction_at_least"]["0.98"] == pytest.approx(4 / 21, abs=0.005)
    again = similarity_statistics(
        hand_made_corpus(), bins=25, batch_size=7, exact_limit=0, num_pairs=200_000, seed=3
    )
    assert again["histogram"] == stats["histogram"]


def clustered_corpus() -> torch.Tensor:
    """200 reports in 10 clusters of different tightness: within-cluster R = c², c² far from
    every default threshold, across clusters R = 0."""
    within = [0.5, 0.82, 0.87, 0.92, 0.97, 0.995, 0.6, 0.88, 0.93, 0.99]
    rows = []
    for member in range(200):
        cluster = member % 10
        c = math.sqrt(within[cluster])
        row = torch.zeros(384)
        row[cluster] = c
        row[10 + member] = math.sqrt(1 - c * c)  # each member's own direction
        rows.append(row)
    return torch.stack(rows)


def test_batch_false_negative_rate_equals_direct_computation():
    embeddings = clustered_corpus()
    stats = similarity_statistics(embeddings, batch_size=32, num_batches=20, seed=5)
    batches = sample_batches(200, 32, 20, seed=5).numpy()
    s = embeddings.double().numpy()
    s /= np.linalg.norm(s, axis=1, keepdims=True)
    for threshold in (0.8, 0.85, 0.9, 0.95, 0.98):
        fractions = []
        for batch in batches:
            report_sim = s[batch] @ s[batch].T
            off_diagonal = ~np.eye(len(batch), dtype=bool)
            fractions.append((report_sim[off_diagonal] >= threshold).mean())
        direct = stats["batch"][str(threshold)]
        assert direct["pair_fraction_mean"] == pytest.approx(np.mean(fractions), abs=1e-6)
        assert direct["pair_fraction_std"] == pytest.approx(np.std(fractions, ddof=1), abs=1e-6)
        # Corpus-wide fraction, counted pair by pair.
        all_sim = s @ s.T
        upper = np.triu_indices(200, k=1)
        expected = (all_sim[upper] >= threshold).mean()
        assert stats["fraction_at_least"][str(threshold)] == pytest.approx(expected, abs=1e-12)


def test_sample_batches_are_epochs_of_disjoint_batches():
    batches = sample_batches(100, 30, 7, seed=0)
    assert batches.shape == (7, 30)
    first_epoch = batches[:3].flatten()
    assert first_epoch.unique().numel() == 90  # drop_last: 3 full batches per epoch
    assert all(batch.unique().numel() == 30 for batch in batches)
    assert torch.equal(batches, sample_batches(100, 30, 7, seed=0))
    assert not torch.equal(batches, sample_batches(100, 30, 7, seed=1))


@pytest.mark.parametrize("block_size", [1, 2, 64])
def test_flag_precision_and_recall_on_a_hand_made_corpus(block_size):
    """Five reports: a, b, c state the same findings; d and e others. R: a-b 0.96 (equal,
    flagged at 0.9), a-c 0.6 (equal, missed), d-e 0.92 (not equal, a false flag); the rest
    below 0.5. At 0.9: 2 flagged pairs, 1 right: precision 1/2; 3 equal pairs, 1 found:
    recall 1/3; 2 of 10 pairs flagged."""
    from sista_core.similarity import flag_quality

    def unit(angle: float) -> list[float]:
        return [math.cos(angle), math.sin(angle), 0.0]

    a = unit(0.0)
    b = unit(math.acos(0.96))
    c = unit(-math.acos(0.6))
    d = [0.0, 0.0, 1.0]
    e = [math.sqrt(1 - 0.92**2), 0.0, 0.92]
    vectors = torch.tensor([a, b, c, d, e])
    truth = ["effusion", "effusion", "effusion", "normal", "nodule"]
    quality = flag_quality(vectors, truth, [0.5, 0.9, 0.99], block_size=block_size)
    assert quality["equal_fraction"] == pytest.approx(3 / 10)
    at_09 = quality["0.9"]
    assert at_09["precision"] == pytest.approx(1 / 2)
    assert at_09["recall"] == pytest.approx(1 / 3)
    assert at_09["flagged_fraction"] == pytest.approx(2 / 10)
    assert math.isnan(quality["0.99"]["precision"]) and quality["0.99"]["recall"] == 0.0
    assert quality["0.5"]["recall"] == pytest.approx(2 / 3)  # b-c is only 0.35


def test_a_zero_semantics_row_is_similar_to_nothing():
    from sista_core.similarity import flag_quality

    quality = flag_quality(torch.zeros(3, 4), ["x", "x", "y"], [0.5])
    assert quality["0.5"]["flagged_fraction"] == 0.0 and quality["0.5"]["recall"] == 0.0


def test_text_states_written_as_they_arrive_read_back_in_record_order(tmp_path):
    from components.platform.config import Params
    from components.stages.similarity import TextStatesWriter

    rng = np.random.default_rng(0)
    counts = [3, 1, 4, 2]
    states = [rng.standard_normal((n, 5)).astype(np.float32) for n in counts]
    with TextStatesWriter(tmp_path / "text_states", counts, 2, Params()) as writer:
        for position in (2, 0, 3, 1):  # batches arrive sorted by length, not in record order
            writer.write(position, states[position])
    offsets = np.load(tmp_path / "text_states" / "offsets.npy")
    stored = np.load(tmp_path / "text_states" / "states.npy")
    for position, expected in enumerate(states):
        np.testing.assert_array_equal(stored[offsets[position] : offsets[position + 1]], expected)
    with (
        TextStatesWriter(tmp_path / "again", counts, 2, Params()) as writer,
        pytest.raises(ValueError, match="report 1: 2 states for 1 tokens"),
    ):
        writer.write(1, states[3])


def test_neighbour_table_names_each_reports_neighbours_in_rank_order():
    import pyarrow as pa

    from components.stages.similarity import neighbour_table

    ids = pa.array(["a", "b", "c", "d"])
    indices = torch.tensor([[1, 2], [0, 3], [3, 0], [2, 1]])
    sims = torch.tensor([[0.9, 0.5], [0.9, 0.1], [0.8, 0.5], [0.8, 0.2]])
    table = neighbour_table(ids, indices, sims)
    assert table.column("record_id").to_pylist() == ["a", "b", "c", "d"]
    assert table.column("neighbour_ids").to_pylist() == [
        ["b", "c"],
        ["a", "d"],
        ["d", "a"],
        ["c", "b"],
    ]
    np.testing.assert_allclose(
        np.array(table.column("similarity").to_pylist()), sims.numpy(), rtol=0, atol=0
    )
