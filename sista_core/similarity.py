"""Report-similarity cache maths (docs/method.md, "The report-similarity cache").

R_ij = cos(s_i, s_j) over every report of a corpus, without ever holding the N x N matrix:
exact top-k neighbours and the statistics a user needs to choose the SIA threshold δ are
built block by block, so memory is O(N·k + block_size²) on top of the (N, d) embeddings.
Embeddings may be stored in float16; every block is computed in float32.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_THRESHOLDS: tuple[float, ...] = (0.8, 0.85, 0.9, 0.95, 0.98)
EXACT_STATISTICS_LIMIT = 50_000
_PAIR_CHUNK = 1 << 16  # sampled pairs gathered at once: 2 x 65536 x d float32
# Candidates per row and k that one block may offer before it is cut to its top k instead.
_MAX_CANDIDATES_PER_ROW = 4
_TILE = 64  # neighbours summarised by one maximum when looking for candidates


def _normalised_block(embeddings: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Rows start:stop of (N, d) as an L2-normalised float32 block (b, d)."""
    return F.normalize(embeddings[start:stop].float(), dim=-1)


def _check_finite(embeddings: torch.Tensor) -> None:
    if embeddings.ndim != 2:
        raise ValueError(f"embeddings must be (N, d), got shape {tuple(embeddings.shape)}")
    bad = ~torch.isfinite(embeddings).all(dim=-1)
    if bad.any():
        rows = bad.nonzero().flatten()[:5].tolist()
        raise ValueError(f"embeddings hold NaN or inf in {int(bad.sum())} rows (first: {rows})")


def _block_topk(report_sim: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k per row of a (b, c) block, ties at the k-th value going to the lower column.

    torch.topk picks arbitrarily among equal values (identical reports are common). Asking
    for k + 1 shows where a tie straddles the cut (the (k+1)-th value equals the k-th) at
    almost no cost; only those rows are redone, keeping the lowest tied columns.
    """
    num_columns = report_sim.shape[1]
    if num_columns <= k:
        return report_sim.topk(num_columns, dim=1)
    values, columns = report_sim.topk(k + 1, dim=1)
    kth_sim = values[:, k - 1 : k]
    tie_at_cut = (values[:, k] == values[:, k - 1]).nonzero().flatten()
    values, columns = values[:, :k], columns[:, :k]
    if tie_at_cut.numel():
        tied_sim, kth_tied = report_sim[tie_at_cut], kth_sim[tie_at_cut]
        at_kth = tied_sim == kth_tied
        still_needed = k - (tied_sim > kth_tied).sum(dim=1, keepdim=True)
        kept = (tied_sim > kth_tied) | (at_kth & (at_kth.cumsum(dim=1) <= still_needed))
        kept_columns = kept.nonzero()[:, 1].view(-1, k)  # row-major: k per row, ascending
        values[tie_at_cut] = tied_sim.gather(1, kept_columns)
        columns[tie_at_cut] = kept_columns
    return values, columns


def _descending_key(targets: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
    """int64 keys that sort ascending as (target ascending, similarity descending).

    A float32's bits, read as int32 and with the magnitude bits of negatives flipped, order
    like the float does (-inf lowest); -0.0 is made +0.0 first so that equal similarities
    get equal keys. Targets are block rows (< 2**31), so both fit one int64.
    """
    bits = (sims + 0.0).view(torch.int32)
    ordered = torch.where(bits < 0, bits ^ 0x7FFFFFFF, bits).long()
    return (targets.long() << 32) | ((1 << 31) - 1 - ordered)


def _stable_argsort(values: torch.Tensor) -> torch.Tensor:
    """Stable argsort of a 1-D tensor; numpy's timsort on the CPU.

    Timsort is near linear on input made of sorted runs, as merges' is, and runs on one
    thread: torch's parallel sort took 20x longer on 2 cores that other processes kept
    busy (each parallel region waits for its slowest thread).
    """
    if values.device.type == "cpu":
        return torch.from_numpy(np.argsort(values.numpy(), kind="stable"))
    return values.argsort(stable=True)


def _merge_candidates(
    best_sim: torch.Tensor,
    best_index: torch.Tensor,
    targets: torch.Tensor,
    neighbours: torch.Tensor,
    sims: torch.Tensor,
) -> None:
    """Merge candidate triples into the running lists (b, k) in place.

    Candidate m offers neighbour ``neighbours[m]`` at similarity ``sims[m]`` to row
    ``targets[m]`` of the block. Each touched row keeps its k best of (its list, its
    candidates) in the total order: similarity descending, then neighbour index ascending.
    Padding (index -1, similarity -inf) sorts after every real, finite entry.
    """
    k = best_sim.shape[1]
    candidates_per_row = torch.bincount(targets, minlength=len(best_sim))
    rows = candidates_per_row.nonzero().flatten()  # ascending
    candidates_per_row = candidates_per_row[rows]
    targets = torch.cat([rows.repeat_interleave(k), targets])
    neighbours = torch.cat([best_index[rows].flatten(), neighbours])
    sims = torch.cat([best_sim[rows].flatten(), sims])
    key = _descending_key(targets, sims)
    # One stable sort, nearly free on input this ordered (lists sorted, candidates grouped).
    # Equal keys (one row, one similarity) must end lowest neighbour first: the input holds
    # each row's list, then its candidates as offered, block by block, which is neighbour
    # order and survives a stable sort; where it was not (ties inside a block's top-k),
    # sort by neighbour first.
    order = _stable_argsort(key)
    sorted_key, sorted_neighbour = key[order], neighbours[order]
    misordered = (sorted_key[1:] == sorted_key[:-1]) & (
        sorted_neighbour[1:] < sorted_neighbour[:-1]
    )
    if misordered.any():
        order = _stable_argsort(neighbours)
        order = order[_stable_argsort(key[order])]
    # Rows are now contiguous, best first; each holds k + its candidates: keep its first k.
    per_row = candidates_per_row + k
    first = per_row.cumsum(0) - per_row
    rank = torch.arange(len(order), device=order.device) - first.repeat_interleave(per_row)
    kept = order[rank < k]
    best_sim[rows] = sims[kept].view(-1, k)
    best_index[rows] = neighbours[kept].view(-1, k)


def _buffer_view(buffer: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    """The first rows x columns elements of a flat buffer, as a contiguous (rows, columns)."""
    return buffer[: shape[0] * shape[1]].view(shape)


class _RunningTopk:
    """The running top-k lists (N, k) of every report, fed one similarity block at a time.

    A block entry can enter a row's list only if it is >= the row's current k-th similarity
    (>=, not >: an equal similarity with a lower index wins the tie). After a report's first
    blocks that threshold is high, so a handful of its block's entries pass, out of
    thousands: finding them (``_above_kth``) is far cheaper than a top-k per block and a
    merge per block pair, the previous method. The survivors wait as (row, neighbour,
    similarity) triples and are merged when a block has collected k per row. Thresholds
    read between merges are stale, so lower than or equal to the true k-th value: more
    candidates, never a wrong answer. Memory: the lists, plus fewer than k pending triples
    per row between offers (an offer adds at most 4·k per row before its merge).
    """

    def __init__(self, num_reports: int, k: int, device: torch.device) -> None:
        self.k = k
        self.sim = torch.full((num_reports, k), float("-inf"), device=device)
        self.index = torch.full((num_reports, k), -1, dtype=torch.int64, device=device)
        self._pending: dict[int, list[tuple[torch.Tensor, ...]]] = {}
        self._pending_count: dict[int, int] = {}

    def offer(
        self,
        start: int,
        report_sim: torch.Tensor,
        neighbour_start: int,
        *,
        transposed: bool = False,
    ) -> None:
        """Offer a block of similarities to reports ``start:start + b``.

        ``report_sim`` is (b, c) with column j the neighbour ``neighbour_start + j``, or with
        ``transposed`` (c, b): the reports along its columns (the other side of a symmetric
        block, read in place rather than copied). Excluded entries hold -inf.
        """
        num_rows = report_sim.shape[1] if transposed else report_sim.shape[0]
        kth = self.sim[start : start + num_rows, -1]
        if bool((kth == float("-inf")).any()):
            # A list not yet full (the report's first block): every entry would pass.
            triple = self._block_best(report_sim, neighbour_start, transposed)
        else:
            triple = self._above_kth(start, report_sim, kth, neighbour_start, transposed)
        if triple is None:
            return
        self._pending.setdefault(start, []).append(triple)
        self._pending_count[start] = self._pending_count.get(start, 0) + len(triple[0])
        if self._pending_count[start] >= self.k * num_rows:
            self.flush(start, num_rows)

    def _above_kth(
        self,
        start: int,
        report_sim: torch.Tensor,
        kth: torch.Tensor,
        neighbour_start: int,
        transposed: bool,
    ) -> tuple[torch.Tensor, ...] | None:
        """(target, neighbour, similarity) of the entries >= their row's k-th similarity.

        Found tile by tile: the maximum of each run of up to 64 neighbours (one fast
        reduction) says which runs can hold a candidate, and only those are read again. A
        full comparison mask and its nonzero() cost four times the reduction, for a few
        entries per row.
        """
        # Tiles run along the neighbours, which are the block's rows when transposed: the
        # maximum then reduces over whole rows of the block, in the order memory holds them.
        neighbour_dim = 0 if transposed else 1
        tile = math.gcd(_TILE, report_sim.shape[neighbour_dim])
        tiles = report_sim.unflatten(neighbour_dim, (-1, tile))
        if transposed:  # (tiles, tile, targets)
            hit_tile, hit_row = (tiles.amax(dim=1) >= kth[None, :]).nonzero().unbind(1)
            values = tiles[hit_tile, :, hit_row]  # (hits, tile)
        else:  # (targets, tiles, tile)
            hit_row, hit_tile = (tiles.amax(dim=2) >= kth[:, None]).nonzero().unbind(1)
            values = tiles[hit_row, hit_tile]
        if not len(hit_row):
            return None
        passing = values >= kth[hit_row, None]
        limit = _MAX_CANDIDATES_PER_ROW * self.k * len(kth)
        if int(passing.count_nonzero()) > limit:
            # Mostly ties at the k-th value (identical reports)? One equal to the k-th enters
            # only with a lower index than the k-th's: drop the others, count again.
            neighbour = hit_tile[:, None] * tile + torch.arange(tile, device=values.device)
            kth_index = self.index[start : start + len(kth), -1] - neighbour_start
            passing &= (values > kth[hit_row, None]) | (neighbour < kth_index[hit_row, None])
            if int(passing.count_nonzero()) > limit:  # still a flood: cut to k per row
                return self._block_best(report_sim, neighbour_start, transposed)
        hit, position = passing.nonzero().unbind(1)  # per target, neighbours ascending
        neighbours = hit_tile[hit] * tile + position + neighbour_start
        return hit_row[hit], neighbours, values[hit, position]

    def _block_best(
        self, report_sim: torch.Tensor, neighbour_start: int, transposed: bool
    ) -> tuple[torch.Tensor, ...]:
        """(target, neighbour, similarity) of each row's k best entries of the block
        (excluded entries, -inf, left out)."""
        block = report_sim.T.contiguous() if transposed else report_sim
        sims, neighbours = _block_topk(block, self.k)
        targets = torch.arange(len(block), device=block.device)[:, None].expand_as(neighbours)
        real = sims > float("-inf")
        return targets[real], neighbours[real] + neighbour_start, sims[real]

    def flush(self, start: int, num_rows: int) -> None:
        """Merge the pending candidates of reports ``start:start + num_rows``."""
        pending = self._pending.pop(start, [])
        self._pending_count.pop(start, None)
        if pending:
            targets, neighbours, sims = (torch.cat(parts) for parts in zip(*pending, strict=True))
            stop = start + num_rows
            _merge_candidates(
                self.sim[start:stop], self.index[start:stop], targets, neighbours, sims
            )


def topk_neighbours(
    embeddings: torch.Tensor,
    k: int,
    block_size: int = 4096,
    exclude_self: bool = True,
    *,
    symmetric: bool = True,
    progress: Callable[[int], None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact cosine top-k neighbours of every row of ``embeddings`` (N, d).

    Returns ``(indices, similarity)``, both (N, k): int64 neighbour indices and float32
    cosine similarities, sorted by similarity descending and, among equal similarities, by
    neighbour index ascending (deterministic whatever the block size). ``exclude_self``
    leaves i out of its own list. ``symmetric`` computes each block pair (i, j >= i) once
    and updates both sides (R is symmetric): half the matrix products, same top-k work.
    ``progress(rows_done)`` is called after each row block with the number of rows whose
    lists are final. Memory: the running (N, k) lists, O(N·k) pending candidates at most,
    and one block_size² float32 block, reused.
    """
    _check_finite(embeddings)
    num_reports = embeddings.shape[0]
    available = num_reports - 1 if exclude_self else num_reports
    if not 1 <= k <= available:
        raise ValueError(f"k={k} must be in [1, {available}] for N={num_reports} reports")
    if block_size < 1:
        raise ValueError(f"block_size must be positive, got {block_size}")

    lists = _RunningTopk(num_reports, k, embeddings.device)
    side = min(block_size, num_reports)
    # One block's memory, reused: a fresh 64 MB tensor per block pair pays its page faults
    # again (+40 % on the matrix product here), as glibc returns large frees to the OS.
    block_buffer = torch.empty(side * side, device=embeddings.device)
    starts = range(0, num_reports, block_size)
    for row_start in starts:
        row_stop = min(row_start + block_size, num_reports)
        rows = _normalised_block(embeddings, row_start, row_stop)
        for col_start in starts[row_start // block_size :] if symmetric else starts:
            col_stop = min(col_start + block_size, num_reports)
            cols = (
                rows
                if col_start == row_start
                else _normalised_block(embeddings, col_start, col_stop)
            )
            report_sim = torch.mm(
                rows, cols.T, out=_buffer_view(block_buffer, (len(rows), len(cols)))
            )  # (b_rows, b_cols)
            if col_start == row_start and exclude_self:
                report_sim.fill_diagonal_(float("-inf"))
            lists.offer(row_start, report_sim, col_start)
            if symmetric and col_start != row_start:
                lists.offer(col_start, report_sim, row_start, transposed=True)
        # Every pair of this row block's reports has been seen: their lists are final.
        lists.flush(row_start, row_stop - row_start)
        if progress is not None:
            progress(row_stop)
    return lists.index, lists.sim


def add_neighbours(
    embeddings: torch.Tensor,
    indices: torch.Tensor,
    similarity: torch.Tensor,
    new_rows: torch.Tensor,
    block_size: int = 4096,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-k lists of every row of ``embeddings`` (N, d) after reports ``new_rows`` were
    added, without recomputing the old pairs: ``indices``/``similarity`` (N, k) hold each
    other row's exact top-k among the other rows (the new rows' entries are ignored). Each old
    row merges its list with its best new reports; each new row gets its top-k over all.
    The result is :func:`topk_neighbours`' (self excluded, same order and ties), for
    ``|new| x N`` products instead of ``N x N`` / 2. Memory: the lists and one block."""
    _check_finite(embeddings)
    num_reports, k = indices.shape
    new_rows = torch.as_tensor(new_rows, dtype=torch.long).unique()  # ascending
    if not 1 <= k <= num_reports - 1:
        raise ValueError(f"k={k} must be in [1, {num_reports - 1}] for N={num_reports} reports")
    is_new = torch.zeros(num_reports, dtype=torch.bool)
    is_new[new_rows] = True
    old_rows = (~is_new).nonzero().flatten()
    best_index, best_sim = indices.clone(), similarity.clone().float()
    best_index[new_rows], best_sim[new_rows] = -1, float("-inf")

    def offer(rows: torch.Tensor, columns: torch.Tensor) -> None:
        """Merge into ``rows``' lists their best among ``columns`` (both ascending)."""
        if not len(rows) or not len(columns):
            return
        row_block = F.normalize(embeddings[rows].float(), dim=-1)
        sims, index = best_sim[rows], best_index[rows]
        for start in range(0, len(columns), block_size):
            chosen = columns[start : start + block_size]
            report_sim = row_block @ F.normalize(embeddings[chosen].float(), dim=-1).T
            report_sim[rows[:, None] == chosen[None, :]] = float("-inf")  # not itself
            top_sim, top_column = _block_topk(report_sim, min(k, len(chosen)))
            targets = torch.arange(len(rows))[:, None].expand_as(top_column)
            real = top_sim > float("-inf")
            _merge_candidates(sims, index, targets[real], chosen[top_column][real], top_sim[real])
        best_sim[rows], best_index[rows] = sims, index

    all_rows = torch.arange(num_reports)
    for start in range(0, len(new_rows), block_size):
        offer(new_rows[start : start + block_size], all_rows)
    for start in range(0, len(old_rows), block_size):
        offer(old_rows[start : start + block_size], new_rows)
    return best_index, best_sim


def duplicate_groups(
    indices: torch.Tensor, similarity: torch.Tensor, threshold: float = 0.999
) -> torch.Tensor:
    """Near-duplicate report groups from a top-k table (N, k), as (N,) group ids.

    Single linkage over the top-k pairs with similarity >= threshold; a group's id is its
    smallest member index, so a report with no near-duplicate is its own group. Pairs
    beyond the top-k are not seen, but with exact duplicates every member's list holds the
    lowest-index members (ties go to the lower index), which joins the whole group.
    """
    num_reports = indices.shape[0]
    source = torch.arange(num_reports, device=indices.device)[:, None].expand_as(indices)
    linked = (similarity >= threshold) & (indices >= 0)
    ends = torch.cat([source[linked], indices[linked]])
    other_ends = torch.cat([indices[linked], source[linked]])
    group = torch.arange(num_reports, device=indices.device)
    while True:
        # Each report takes the smallest id among its linked reports, then ids are
        # short-cut (pointer jumping) until nothing changes: a few passes, not N.
        updated = group.scatter_reduce(0, ends, group[other_ends], reduce="amin")
        updated = updated[updated]
        if torch.equal(updated, group):
            return group
        group = updated


def sample_batches(
    num_reports: int, batch_size: int, num_batches: int, seed: int = 0
) -> torch.Tensor:
    """Training-like batches (num_batches, batch_size) of report indices.

    Like a shuffling data loader with drop_last: each epoch is a seeded permutation cut into
    full batches; epochs repeat until num_batches are drawn.
    """
    if not 2 <= batch_size <= num_reports:
        raise ValueError(f"batch_size={batch_size} must be in [2, {num_reports}]")
    if num_batches < 1:
        raise ValueError(f"num_batches must be positive, got {num_batches}")
    generator = torch.Generator().manual_seed(seed)
    per_epoch = num_reports // batch_size
    batches = []
    while len(batches) < num_batches:
        order = torch.randperm(num_reports, generator=generator)
        batches.extend(order[: per_epoch * batch_size].view(per_epoch, batch_size))
    return torch.stack(batches[:num_batches])


def _count_pairs(
    report_sim: torch.Tensor,
    thresholds: torch.Tensor,
    histogram: torch.Tensor,
    at_least: torch.Tensor,
    ignored: torch.Tensor | None = None,
) -> None:
    """Add similarities (any shape) to the histogram and the >= threshold counts, leaving
    out the ``ignored`` positions (bool, same shape). Bin m of ``bins`` holds R in
    [-1 + m·w, -1 + (m+1)·w), w = 2 / bins, the last bin including 1. Arithmetic binning,
    not bucketize, which costs 4x more on the CPU."""
    bins = histogram.numel()
    position = ((report_sim + 1.0) * (bins / 2)).floor_().clamp_(0, bins - 1).int()
    # passed = number of thresholds <= R; pairs >= threshold m are those with passed > m
    passed = torch.bucketize(report_sim, thresholds, right=True, out_int32=True)
    if ignored is not None:
        position.masked_fill_(ignored, bins)  # an overflow bin, dropped below
        passed.masked_fill_(ignored, 0)
    histogram += torch.bincount(position.flatten(), minlength=bins + 1)[:bins].cpu()
    per_level = torch.bincount(passed.flatten(), minlength=thresholds.numel() + 1)
    at_least += per_level.flip(0).cumsum(0).flip(0)[1:].cpu()


def _pair_distribution(
    embeddings: torch.Tensor,
    bins: int,
    thresholds: torch.Tensor,
    *,
    exact_limit: int,
    num_pairs: int,
    block_size: int,
    generator: torch.Generator,
) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """Histogram and >= threshold counts of off-diagonal R, exact or over sampled pairs."""
    num_reports = embeddings.shape[0]
    histogram = torch.zeros(bins, dtype=torch.int64)
    at_least = torch.zeros(thresholds.numel(), dtype=torch.int64)
    if num_reports <= exact_limit:
        for row_start in range(0, num_reports, block_size):
            row_stop = min(row_start + block_size, num_reports)
            rows = _normalised_block(embeddings, row_start, row_stop)
            # Each unordered pair once: blocks j >= i, and only j > i inside diagonal blocks.
            lower = torch.ones(len(rows), len(rows), dtype=torch.bool, device=rows.device).tril()
            for col_start in range(row_start, num_reports, block_size):
                col_stop = min(col_start + block_size, num_reports)
                report_sim = rows @ _normalised_block(embeddings, col_start, col_stop).T
                ignored = lower if col_start == row_start else None
                _count_pairs(report_sim, thresholds, histogram, at_least, ignored)
        pairs = num_reports * (num_reports - 1) // 2
        return histogram, at_least, {"method": "exact", "pairs": pairs}

    # Uniform over ordered pairs i != j (R is symmetric, so over unordered pairs too).
    for start in range(0, num_pairs, _PAIR_CHUNK):
        count = min(_PAIR_CHUNK, num_pairs - start)
        first = torch.randint(num_reports, (count,), generator=generator)
        second = torch.randint(num_reports - 1, (count,), generator=generator)
        second += (second >= first).long()
        first, second = first.to(embeddings.device), second.to(embeddings.device)
        report_sim = (
            F.normalize(embeddings[first].float(), dim=-1)
            * F.normalize(embeddings[second].float(), dim=-1)
        ).sum(-1)
        _count_pairs(report_sim, thresholds, histogram, at_least)
    method = f"sampled: {num_pairs} uniform random pairs i != j (N > {exact_limit})"
    return histogram, at_least, {"method": method, "pairs": num_pairs}


def batch_false_negative_rates(
    embeddings: torch.Tensor, batches: torch.Tensor, thresholds: Sequence[float]
) -> dict[str, torch.Tensor]:
    """Per batch (num_batches, B) of indices and per threshold, what SIA would flag.

    Returns (num_batches, T) tensors: ``pair_fraction``, the fraction of off-diagonal
    in-batch pairs with R >= δ; ``anchors_with_any``, the fraction of anchors with at least
    one false negative in the batch.
    """
    num_batches, batch_size = batches.shape
    pair_fraction = torch.empty(num_batches, len(thresholds))
    anchors_with_any = torch.empty(num_batches, len(thresholds))
    group = max(1, (1 << 24) // batch_size**2)  # batches per step: ~64 MB of float32 R
    for first in range(0, num_batches, group):
        s = F.normalize(embeddings[batches[first : first + group]].float(), dim=-1)  # (g, B, d)
        report_sim = s @ s.transpose(1, 2)  # (g, B, B)
        report_sim.diagonal(dim1=1, dim2=2).fill_(float("-inf"))  # i is not its own negative
        for m, threshold in enumerate(thresholds):
            flagged = report_sim >= threshold
            pairs = flagged.sum(dim=(1, 2)) / (batch_size * (batch_size - 1))
            pair_fraction[first : first + group, m] = pairs.cpu()
            anchors_with_any[first : first + group, m] = flagged.any(dim=2).float().mean(1).cpu()
    return {"pair_fraction": pair_fraction, "anchors_with_any": anchors_with_any}


def similarity_statistics(
    embeddings: torch.Tensor,
    thresholds: Sequence[float] = DEFAULT_THRESHOLDS,
    bins: int = 200,
    batch_size: int = 256,
    num_batches: int = 200,
    seed: int = 0,
    *,
    exact_limit: int = EXACT_STATISTICS_LIMIT,
    num_pairs: int = 4_000_000,
    block_size: int = 4096,
) -> dict:
    """Distribution of R over a corpus (N, d) and what each δ would flag, to choose δ.

    - ``histogram``: counts of off-diagonal R in ``bins`` equal bins over [-1, 1]
      (``bin_edges``), each unordered pair once. Exact block-wise for N <= exact_limit;
      beyond, over ``num_pairs`` seeded uniform random pairs: ``method`` says which.
    - ``fraction_at_least[δ]``: fraction of off-diagonal pairs with R >= δ.
    - ``batch[δ]``: over ``num_batches`` seeded training-like batches of ``batch_size``
      (``sample_batches``), mean and std of the fraction of in-batch off-diagonal pairs with
      R >= δ (the false negatives SIA removes), the mean number per anchor, and the mean
      fraction of anchors with at least one.
    All floats are plain Python numbers, ready for json.
    """
    _check_finite(embeddings)
    num_reports = embeddings.shape[0]
    if num_reports < 2:
        raise ValueError("similarity statistics need at least 2 reports")
    thresholds = sorted(float(t) for t in thresholds)
    if not all(-1.0 <= t <= 1.0 for t in thresholds):
        raise ValueError(f"thresholds must lie in [-1, 1], got {thresholds}")
    device = embeddings.device
    thresholds_t = torch.tensor(thresholds, dtype=torch.float32, device=device)
    bin_edges = torch.linspace(-1.0, 1.0, bins + 1)
    generator = torch.Generator().manual_seed(seed)
    histogram, at_least, sampling = _pair_distribution(
        embeddings,
        bins,
        thresholds_t,
        exact_limit=exact_limit,
        num_pairs=num_pairs,
        block_size=block_size,
        generator=generator,
    )

    batch_size = min(batch_size, num_reports)
    batches = sample_batches(num_reports, batch_size, num_batches, seed=seed)
    rates = batch_false_negative_rates(embeddings, batches, thresholds)
    pair_fraction, anchors_with_any = rates["pair_fraction"], rates["anchors_with_any"]
    std = pair_fraction.std(dim=0) if num_batches > 1 else torch.zeros(len(thresholds))
    batch = {
        str(t): {
            "pair_fraction_mean": float(pair_fraction[:, m].mean()),
            "pair_fraction_std": float(std[m]),
            "per_anchor_mean": float(pair_fraction[:, m].mean()) * (batch_size - 1),
            "anchors_with_any_mean": float(anchors_with_any[:, m].mean()),
        }
        for m, t in enumerate(thresholds)
    }
    pairs = sampling["pairs"]
    return {
        "num_reports": num_reports,
        "method": sampling["method"],
        "pairs": pairs,
        "seed": seed,
        "bin_edges": bin_edges.tolist(),
        "histogram": histogram.tolist(),
        "fraction_at_least": {
            str(t): int(c) / pairs for t, c in zip(thresholds, at_least, strict=True)
        },
        "batch_size": batch_size,
        "num_batches": num_batches,
        "batch": batch,
        "mean": _histogram_mean(histogram, bin_edges),
    }


def _histogram_mean(histogram: torch.Tensor, bin_edges: torch.Tensor) -> float:
    """Approximate mean of R from bin centres (for a one-line summary)."""
    centres = (bin_edges[1:] + bin_edges[:-1]) / 2
    total = int(histogram.sum())
    return float((histogram.double() * centres.double()).sum() / total) if total else math.nan


FLAG_BLOCK_PAIRS = 1 << 22  # pairs compared at once by flag_quality (a few tens of MB)


def flag_quality(
    semantics: torch.Tensor,
    truth: Sequence[object],
    thresholds: Sequence[float],
    block_size: int = 2048,
) -> dict[str, dict[str, float]]:
    """How well ``R >= δ`` finds the pairs that should not be negatives, over every unordered
    pair of a corpus: ``semantics`` (N, d) rows (cosine similarity; a zero row is similar to
    nothing) and ``truth[i]``, a hashable key per row, two rows being a true false negative
    when their keys are equal (e.g. the same labeler findings). Per δ: ``precision`` (share of
    flagged pairs that are equal), ``recall`` (share of equal pairs flagged; NaN when none is)
    and ``flagged_fraction`` (share of all pairs flagged: the expected in-batch flag rate).
    ``equal_fraction`` is the share of equal pairs. Exact, in blocks of at most
    ``block_size`` rows and ``FLAG_BLOCK_PAIRS`` pairs: memory does not grow with N."""
    count = semantics.shape[0]
    block_size = max(1, min(block_size, FLAG_BLOCK_PAIRS // max(count, 1)))
    if count != len(truth):
        raise ValueError(f"{count} semantics rows but {len(truth)} truth keys")
    codes = {key: code for code, key in enumerate(dict.fromkeys(truth))}
    key = torch.tensor([codes[item] for item in truth])
    unit = F.normalize(semantics.float(), dim=1)
    levels = sorted(float(t) for t in thresholds)
    flagged = torch.zeros(len(levels), dtype=torch.float64)
    hits = torch.zeros(len(levels), dtype=torch.float64)
    equal = 0.0
    for start in range(0, count, block_size):
        stop = min(start + block_size, count)
        sims = unit[start:stop] @ unit.T  # (b, N)
        same = key[start:stop, None] == key[None, :]
        upper = torch.arange(count)[None, :] > torch.arange(start, stop)[:, None]  # i < j
        sims, same = sims[upper], same[upper]
        equal += float(same.sum())
        for m, level in enumerate(levels):
            above = sims >= level
            flagged[m] += float(above.sum())
            hits[m] += float((above & same).sum())
    pairs = count * (count - 1) / 2
    return {
        "equal_fraction": equal / pairs,
        **{
            str(level): {
                "precision": float(hits[m] / flagged[m]) if flagged[m] else math.nan,
                "recall": float(hits[m] / equal) if equal else math.nan,
                "flagged_fraction": float(flagged[m] / pairs),
            }
            for m, level in enumerate(levels)
        },
    }
