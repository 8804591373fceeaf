"""Pre-training batches pair image i with report i and semantics i, and the workers' shares of
each global batch are disjoint and together cover the epoch."""

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from components.stages.pretrain_data import PretrainData
from components.stages.reports import TOKENS_FILE, token_table_writer
from sista_core.findings import OBSERVATIONS

RECORDS = 24  # pre-training train records; a few more rows that must be left out


def finding_labels(n: int) -> list[float | None]:
    """Record n's finding labels: positive n mod 19, uncertain the next one, others absent."""
    labels: list[float | None] = [None] * len(OBSERVATIONS)
    labels[n % len(OBSERVATIONS)], labels[(n + 1) % len(OBSERVATIONS)] = 1.0, -1.0
    return labels


def record_id(n: int) -> str:
    return f"r{n:03d}"


def number(record: str) -> int:
    return int(record[1:])


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """Stage outputs in their on-disk layout, every field encoding its record's number n:
    pixels all n, input_ids [101, n, 102], the embedding 1 at column n and n / 64 in the last
    column, finding labels from n. The three tables list the records in different orders, and
    the shards split them unevenly."""
    root = tmp_path_factory.mktemp("data")
    for stage in ("ingest/shards", "reports", "similarity"):
        (root / stage).mkdir(parents=True)
    rng = np.random.default_rng(0)
    numbers = list(range(RECORDS + 6))  # 24 train, 3 val, 1 downstream, 2 without a report
    split = {n: "val" if RECORDS <= n < RECORDS + 3 else "train" for n in numbers}
    in_shard = {"pretrain-a.npy": numbers[:10], "pretrain-b.npy": numbers[10:]}
    manifest = []
    for shard, members in in_shard.items():
        order = rng.permutation(members).tolist()
        np.save(
            root / "ingest/shards" / shard,
            np.stack([np.full((4, 4), n, np.uint8) for n in order]),
        )
        for index, n in enumerate(order):
            dataset = "chexpert" if n == RECORDS + 3 else "pretrain"
            manifest.append(
                {
                    "record_id": record_id(n),
                    "dataset": dataset,
                    "split": split[n],
                    "shard": shard,
                    "index": index,
                }
            )
    manifest = [manifest[i] for i in rng.permutation(len(manifest))]
    pq.write_table(pa.Table.from_pylist(manifest), root / "ingest/manifest.parquet")
    with_report = [n for n in numbers if n < RECORDS + 4]  # the last two have none
    reports = [
        {
            "record_id": record_id(n),
            "text": f"report {n}",
            "input_ids": [101, n, 102],
            "word_index": [-1, 0, -1],
            "word_mask": [False, True, False],
            "words_text": [f"w{n}"],
            "labels": finding_labels(n),
        }
        for n in rng.permutation(with_report).tolist()
    ]
    with token_table_writer(root / "reports" / TOKENS_FILE) as write_tokens:
        write_tokens(pa.Table.from_pylist(reports))
    ids = rng.permutation(numbers).tolist()
    (root / "similarity/record_ids.txt").write_text("\n".join(record_id(n) for n in ids) + "\n")
    embeddings = np.zeros((len(ids), 64), np.float16)
    embeddings[np.arange(len(ids)), ids] = 1.0
    embeddings[:, -1] = np.array(ids) / 64  # the number itself, readable back
    np.save(root / "similarity/embeddings.npy", embeddings)
    return root


def record_of_each_field(batch) -> list[tuple[int, int, int, int, str]]:
    """Per row: the record number its image, tokens, semantics and id each carry."""
    return [
        (
            int(image[0, 0]) if (image == image[0, 0]).all() else -1,
            tokens["input_ids"][1],
            int(np.argmax(semantics[:-1])),
            round(float(semantics[-1]) * 64),
            record,
        )
        for image, tokens, semantics, record in zip(
            batch.images, batch.tokens, batch.semantics, batch.record_ids, strict=True
        )
    ]


def test_only_the_splits_records_with_a_report_are_read(data_root):
    train = PretrainData(data_root, "train")
    assert sorted(map(number, train.record_ids)) == list(range(RECORDS))
    val = PretrainData(data_root, "val")
    assert sorted(map(number, val.record_ids)) == [RECORDS, RECORDS + 1, RECORDS + 2]


@pytest.mark.parametrize(
    ("batch_size", "world_size"), [(4, 1), (4, 2), (4, 3), (3, 2), (5, 2), (2, 4)]
)
def test_every_row_lines_up_and_the_workers_shares_split_the_epoch(
    data_root, batch_size, world_size
):
    data = PretrainData(data_root, "train")
    steps = data.steps_per_epoch(batch_size, world_size)
    assert steps == RECORDS // (batch_size * world_size)
    for epoch in (0, 1):
        seen: list[int] = []
        for step_batches in zip(
            *(
                data.batches(epoch, rank, world_size, batch_size, seed=7)
                for rank in range(world_size)
            ),
            strict=True,
        ):
            global_batch = []
            for batch in step_batches:
                assert len(batch.record_ids) == batch_size  # the gather needs equal parts
                for image_n, token_n, semantics_n, value_n, record in record_of_each_field(batch):
                    assert image_n == token_n == semantics_n == value_n == number(record)
                    global_batch.append(number(record))
            assert len(set(global_batch)) == len(global_batch)  # the workers' parts are disjoint
            seen += global_batch
        assert len(seen) == steps * batch_size * world_size == len(set(seen))
        # Only the last, incomplete global batch is dropped.
        assert RECORDS - len(seen) < batch_size * world_size
        if RECORDS % (batch_size * world_size) == 0:
            assert sorted(seen) == list(range(RECORDS))


def test_label_semantics_line_up_too(data_root):
    data = PretrainData(data_root, "train", semantics="labels")
    batch = next(data.batches(0, 0, 1, 8, seed=0))
    for semantics, record in zip(batch.semantics, batch.record_ids, strict=True):
        expected = np.zeros(len(OBSERVATIONS), np.float32)
        n = number(record)
        expected[n % len(OBSERVATIONS)], expected[(n + 1) % len(OBSERVATIONS)] = 1.0, 0.5
        np.testing.assert_array_equal(semantics, expected)


def test_a_resumed_epoch_yields_the_batches_it_had_left(data_root):
    data = PretrainData(data_root, "train")
    whole = [b.record_ids for b in data.batches(3, 1, 2, 4, seed=7)]
    resumed = [b.record_ids for b in data.batches(3, 1, 2, 4, seed=7, skip=1)]
    assert resumed == whole[1:]


def test_single_rows_slices_and_dtypes_read_like_the_batches(data_root):
    data = PretrainData(data_root, "train")
    n = number(data.record_ids[5])
    row = data.semantics[5]  # one row: a (64,) vector, float32 like a batch's
    assert row.shape == (64,) and row.dtype == np.float32 and round(float(row[-1]) * 64) == n
    rows = data.semantics[np.array([7, 2, 5])]
    assert rows.shape == (3, 64) and rows.dtype == np.float32
    assert [round(float(v) * 64) for v in rows[:, -1]] == [
        number(data.record_ids[i]) for i in (7, 2, 5)
    ]
    assert data.tokens[1:3] == [data.tokens[1], data.tokens[2]]
    assert data.tokens[1]["input_ids"] == [101, number(data.record_ids[1]), 102]


def with_text_states(data_root, tmp_path, meta, lengths=None):
    """A copy of the stage outputs whose similarity stage kept frozen text states: record n's
    token t has the state [n, t] (rows in the similarity stage's order)."""
    import json
    import shutil

    root = tmp_path / "data"
    shutil.copytree(data_root, root)  # makes tmp_path too
    ids = (root / "similarity/record_ids.txt").read_text().split()
    lengths = lengths or {}
    states = [[number(r), t] for r in ids for t in range(lengths.get(number(r), 3))]
    offsets = np.cumsum([0] + [lengths.get(number(r), 3) for r in ids])
    folder = root / "similarity/text_states"
    folder.mkdir()
    np.save(folder / "states.npy", np.array(states, np.float32))
    np.save(folder / "offsets.npy", offsets)
    (folder / "states.json").write_text(json.dumps(meta))
    return root


def test_frozen_text_states_line_up_with_their_records(data_root, tmp_path):
    root = with_text_states(data_root, tmp_path, {"frozen_layers": 2, "encoder": "bert"})
    data = PretrainData(root, "train", text_encoder="bert", frozen_text_layers=2)
    assert data.has_text_states
    batch = next(data.batches(0, 0, 1, 8, seed=0))
    for tokens, record in zip(batch.tokens, batch.record_ids, strict=True):
        n = number(record)
        np.testing.assert_array_equal(tokens["frozen_states"], [[n, 0], [n, 1], [n, 2]])
    # States kept for another encoder or depth are not used: the encoder recomputes them.
    for encoder, layers in (("bert", 3), ("roberta", 2), ("bert", 0)):
        other = PretrainData(root, "train", text_encoder=encoder, frozen_text_layers=layers)
        assert not other.has_text_states and "frozen_states" not in other.tokens[0]
    # Label semantics read no embedding, and the states still find their records.
    labels = PretrainData(root, "train", "labels", text_encoder="bert", frozen_text_layers=2)
    n = number(labels.record_ids[4])
    np.testing.assert_array_equal(labels.tokens[4]["frozen_states"], [[n, 0], [n, 1], [n, 2]])
    # Without kept states the encoder runs all its layers.
    assert not PretrainData(
        data_root, "train", text_encoder="bert", frozen_text_layers=2
    ).has_text_states
    # By default the text encoder freezes nothing, whatever states the stage kept.
    plain = with_text_states(data_root, tmp_path / "plain", {"frozen_layers": 1, "encoder": None})
    assert not PretrainData(plain, "train").has_text_states


def test_text_states_of_the_wrong_length_are_refused_naming_the_record(data_root, tmp_path):
    meta = {"frozen_layers": 1, "encoder": "bert"}
    root = with_text_states(data_root, tmp_path, meta, lengths={11: 4})
    with pytest.raises(ValueError, match=r"record r011 has 4 token states for 3 tokens"):
        PretrainData(root, "train", text_encoder="bert", frozen_text_layers=1)
