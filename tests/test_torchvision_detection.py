"""torchvision's FCOS on a cached pyramid (sista_core.heads.torchvision_detection): it learns
one fixed box on a tiny synthetic pyramid, and returns what the hand-written head returns."""

import pytest
import torch
from torchvision.ops import box_iou

from sista_core.heads import detection as handwritten
from sista_core.heads import torchvision_detection as tv

SIZE = 32
BOX = torch.tensor([[6.0, 8.0, 22.0, 20.0]])


@pytest.fixture(autouse=True)
def one_thread():
    """Tensors this small gain nothing from a second thread, and lose much to a busy core."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _pyramid(count: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return [
        torch.randn(count, 16, 8, 8, generator=generator),
        torch.randn(count, 32, 4, 4, generator=generator),
    ]


def test_level_grids_spread_a_vit_grid_and_keep_a_cnn_pyramid():
    assert tv.level_grids([(6, 6)] * 4) == [(24, 24), (12, 12), (6, 6), (3, 3)]
    assert tv.level_grids([(24, 24), (12, 12), (6, 6), (3, 3)]) == [
        (24, 24),
        (12, 12),
        (6, 6),
        (3, 3),
    ]
    assert tv.level_grids([(6, 6)]) == [(6, 6)]


def test_fcos_learns_one_fixed_box_and_returns_the_handwritten_heads_format():
    pyramid = _pyramid()
    boxes = [BOX.clone() for _ in range(len(pyramid[0]) - 1)] + [torch.zeros(0, 4)]  # one negative
    settings = {"lr": 3e-3, "batch_size": 4, "seed": 0, "width": 16}
    rng_before = torch.get_rng_state()
    untrained = tv.train_detector(pyramid, boxes, SIZE, epochs=0, **settings)
    trained = tv.train_detector(pyramid, boxes, SIZE, epochs=60, **settings)
    assert torch.equal(torch.get_rng_state(), rng_before)
    with torch.no_grad():
        before, after = untrained.loss(pyramid, boxes), trained.loss(pyramid, boxes)
    assert after < 0.5 * before, (before, after)

    predicted = tv.predict_boxes(trained, pyramid, SIZE, batch_size=3)
    assert len(predicted) == len(pyramid[0])
    for prediction in predicted[:-1]:  # the positives: the top box is the target's
        top = prediction["boxes"][prediction["scores"].argmax()]
        assert box_iou(top[None], BOX).item() > 0.5

    reference = handwritten.predict_boxes(
        handwritten.train_detector(pyramid, boxes, SIZE, epochs=1, **settings), pyramid, SIZE, 3
    )
    for ours, theirs in zip(predicted, reference, strict=True):
        assert ours.keys() == theirs.keys() == {"boxes", "scores", "labels"}
        for key in ours:
            assert ours[key].dtype == theirs[key].dtype
            assert ours[key].shape[1:] == theirs[key].shape[1:]
        k = len(ours["boxes"])
        assert ours["scores"].shape == ours["labels"].shape == (k,) and k <= 100
        assert (ours["labels"] == 0).all() and (ours["scores"] > 0.05).all()
        assert ours["boxes"].min() >= 0 and ours["boxes"].max() <= SIZE


def test_predict_boxes_refuses_another_film_size():
    pyramid = _pyramid(2)
    model = tv.train_detector(
        pyramid, [BOX, BOX], SIZE, epochs=0, lr=1e-3, batch_size=2, seed=0, width=8
    )
    with pytest.raises(ValueError, match="32 px"):
        tv.predict_boxes(model, pyramid, 64, batch_size=2)
