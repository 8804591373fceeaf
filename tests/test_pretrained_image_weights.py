"""The offline ImageNet weights for timm's efficientnet_lite0: every tensor mapped, and mapped
right (the model recognises natural photographs), with or without the classifier."""

import pytest
import timm
import torch
from PIL import Image

from sista_core.assets import package_file
from sista_core.checkpoint import CheckpointError
from sista_core.encoders.pretrained_weights import (
    MEAN,
    STD,
    efficientnet_lite0_state_dict,
    load_efficientnet_lite0,
    reference_input,
)

PHOTOS = {
    # Grace Hopper in a dark dress uniform and peaked cap (matplotlib's sample image).
    "portrait": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    # A Chinese temple hall by a lake (scikit-learn's sample image).
    "temple": ("sklearn", "datasets/images/china.jpg"),
}
# ImageNet (class, probability) of the correctly loaded weights with the reference input, once
# measured: the top 5 of each photo. A swapped tensor, a wrong epsilon, other normalisation or
# another crop moves some of these by more than the tolerance.
ACADEMIC_GOWN, MORTARBOARD, MILITARY_UNIFORM, PALACE, BELL_COTE = 400, 667, 652, 698, 442
EXPECTED = {
    ("efficientnet_lite0", "portrait"): {
        ACADEMIC_GOWN: 0.454,
        MORTARBOARD: 0.237,
        906: 0.047,  # Windsor tie
        457: 0.034,  # bow tie
        834: 0.026,  # suit
    },
    ("efficientnet_lite0", "temple"): {
        PALACE: 0.400,
        BELL_COTE: 0.293,
        449: 0.044,  # boathouse
        975: 0.039,  # lakeside
        437: 0.024,  # beacon
    },
    # The architecture the weights were trained in (TF "SAME" padding) puts the uniform 3rd;
    # timm's efficientnet_lite0 pads symmetrically, a one-pixel shift that moves probability
    # between the dress classes (the uniform falls to 8th).
    ("tf_efficientnet_lite0", "portrait"): {
        ACADEMIC_GOWN: 0.244,
        MORTARBOARD: 0.213,
        MILITARY_UNIFORM: 0.177,
        887: 0.048,  # vestment
        906: 0.043,  # Windsor tie
    },
}
TOLERANCE = 0.02  # the measured values differ by < 0.005 under mean/std 0.5, same maths


def _classifier(name: str, **kwargs) -> torch.nn.Module:
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    load_efficientnet_lite0(model, include_classifier=True)
    return model


def _inputs(*photos: str) -> torch.Tensor:
    return torch.stack([reference_input(Image.open(package_file(*PHOTOS[p]))) for p in photos])


@pytest.fixture(scope="module")
def lite0() -> torch.nn.Module:
    return _classifier("efficientnet_lite0")


def test_mapping_fills_every_timm_tensor_with_its_shape():
    state = efficientnet_lite0_state_dict()
    target = timm.create_model("efficientnet_lite0", pretrained=False).state_dict()
    assert sorted(state) == sorted(target)
    assert {k: tuple(v.shape) for k, v in state.items()} == {
        k: tuple(v.shape) for k, v in target.items()
    }
    with pytest.raises(CheckpointError, match=r"blocks\.0\.0\.se\.conv_reduce\.weight"):
        load_efficientnet_lite0(timm.create_model("efficientnet_b0"), include_classifier=True)


def test_batchnorm_epsilon_is_folded_into_the_running_variances(lite0):
    """timm's epsilon 1e-5 computes what the trained epsilon 1e-3 computes."""
    trained_eps = _classifier("efficientnet_lite0", bn_eps=1e-3)
    images = torch.randn(2, 3, 96, 96, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(lite0(images), trained_eps(images), atol=1e-4, rtol=1e-4)


def test_the_pretrained_model_recognises_natural_photographs(lite0):
    with torch.no_grad():
        probabilities = {
            ("efficientnet_lite0", photo): p
            for photo, p in zip(PHOTOS, lite0(_inputs(*PHOTOS)).softmax(-1), strict=True)
        }
        exact = _classifier("tf_efficientnet_lite0")(_inputs("portrait")).softmax(-1)[0]
    probabilities["tf_efficientnet_lite0", "portrait"] = exact
    for case, expected in EXPECTED.items():
        top5 = probabilities[case].topk(5).indices.tolist()
        assert top5[:2] == list(expected)[:2], (case, top5)
        measured = {c: round(float(probabilities[case][c]), 3) for c in expected}
        assert all(abs(measured[c] - p) < TOLERANCE for c, p in expected.items()), (
            case,
            measured,
        )


def test_a_backbone_without_classifier_gets_every_other_tensor(lite0):
    backbone = timm.create_model("efficientnet_lite0", pretrained=False, num_classes=0).eval()
    load_efficientnet_lite0(backbone, include_classifier=False)
    full = lite0.state_dict()
    loaded = backbone.state_dict()
    assert set(full) - set(loaded) == {"classifier.weight", "classifier.bias"}
    assert all(torch.equal(loaded[k], full[k]) for k in loaded)

    images = _inputs("portrait")
    with torch.no_grad():
        expected = lite0.forward_head(lite0.forward_features(images), pre_logits=True)
        torch.testing.assert_close(backbone(images), expected)
    data = timm.data.resolve_data_config({}, model=backbone)  # what ImageEncoder reads
    assert data["mean"] == MEAN and data["std"] == STD

    with pytest.raises(CheckpointError, match=r"classifier\.weight is not in the model"):
        load_efficientnet_lite0(backbone, include_classifier=True)


def test_the_image_encoder_loads_them_offline_and_keeps_their_normalisation(lite0, tmp_path):
    from sista_core.encoders.image import ImageEncoder

    encoder = ImageEncoder("efficientnet_lite0", pretrained=True, img_size=96)
    assert encoder.config.mean == pytest.approx(MEAN) and encoder.config.std == pytest.approx(STD)
    for key, value in encoder.backbone.state_dict().items():
        torch.testing.assert_close(value, lite0.state_dict()[key])
    encoder.save_pretrained(tmp_path)
    reloaded = ImageEncoder.from_pretrained(tmp_path)
    images = torch.randint(0, 256, (2, 1, 96, 96), dtype=torch.uint8)
    torch.testing.assert_close(reloaded.normalize(images), encoder.normalize(images))
