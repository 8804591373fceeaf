"""Pre-training reads its images per batch from memory-mapped shards, not a copy of all."""

import numpy as np

from components.platform.shards import ShardImages, read_shard_images


def test_shard_images_return_the_rows_read_shard_images_returns(tmp_path):
    rng = np.random.default_rng(0)
    (tmp_path / "shards").mkdir()
    shards = {
        f"pretrain-train-{k:05d}.npy": rng.integers(0, 256, (4, 6, 6), np.uint8) for k in (0, 1)
    }
    for name, images in shards.items():
        np.save(tmp_path / "shards" / name, images)
    rows = [{"shard": name, "index": i} for name in reversed(list(shards)) for i in (3, 0, 2)]
    images = ShardImages(tmp_path, rows)
    assert len(images) == len(rows)
    np.testing.assert_array_equal(images[:], read_shard_images(tmp_path, rows))
    np.testing.assert_array_equal(images[2:5], read_shard_images(tmp_path, rows[2:5]))
    chosen = np.array([5, 0, 3])
    np.testing.assert_array_equal(
        images[chosen], read_shard_images(tmp_path, [rows[i] for i in chosen])
    )
    np.testing.assert_array_equal(images[[1]][0], shards[rows[1]["shard"]][rows[1]["index"]])
    assert images[[]].shape[0] == 0
    # Memory-mapped, not loaded: the shards stay on disk until a batch asks for rows.
    assert all(isinstance(shard, np.memmap) for shard in images._shards)
