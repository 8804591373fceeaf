import pytest
import torch

from sista_core import SISTAConfig, SISTAModel
from sista_core.checkpoint import CheckpointError
from sista_core.config import ImageConfig, TextConfig
from sista_core.encoders import ImageEncoder

REPORTS = [
    "No acute cardiopulmonary disease.",
    "Heart size is normal. Lungs are clear.",
    "Large right pleural effusion.",
    "Small left pleural effusion with basilar atelectasis.",
    "Moderate cardiomegaly without edema.",
    "Right upper lobe consolidation consistent with pneumonia.",
    "Small left apical pneumothorax.",
    "A 1 cm nodule in the right lower lobe.",
    "Pulmonary edema with bilateral effusions.",
    "Left basilar atelectasis. XXXX catheter in place.",
    "No acute disease. Normal heart size.",
    "Stable cardiomegaly. No pneumothorax.",
    "Bilateral perihilar opacities.",
    "Endotracheal tube in good position.",
    "Hyperinflated lungs, emphysema.",
    "Calcified granuloma in the left upper lobe.",
]


@pytest.fixture(scope="module")
def tiny_config():
    return SISTAConfig(
        image=ImageConfig(name="vit_tiny_patch16_224", img_size=64),
        text=TextConfig(max_length=32),
        embed_dim=32,
    )


@pytest.fixture(scope="module")
def fixed_pairs():
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (16, 64, 64), dtype=torch.uint8, generator=generator)
    semantics = torch.randn(16, 8, generator=generator)
    semantics[10] = semantics[0]  # two "normal" reports: a false negative pair
    return images, semantics


def test_forward_returns_every_term_and_diagnostic(tiny_config, fixed_pairs, text_encoder):
    model = SISTAModel(tiny_config, text_encoder=text_encoder)
    images, semantics = fixed_pairs
    out = model(
        model.image_encoder.normalize(images[:4]), REPORTS[:4], semantics[:4], return_attention=True
    )
    for key in (
        "image_embed",
        "text_embed",
        "loss",
        "loss_sia",
        "loss_sta",
        "loss_intra",
        "fraction_negatives_eliminated",
        "attention_nonzero_per_word",
        "attention",
    ):
        assert key in out, key
    assert out["image_embed"].shape == out["text_embed"].shape == (4, 32)
    assert out["attention"].shape[2] == 16  # 4 x 4 patches at 64 px
    expected_total = out["loss_sia"] + out["loss_sta"] + 0.5 * out["loss_intra"]
    assert torch.allclose(out["loss"], expected_total)
    assert 0 < out["attention_nonzero_per_word"] < 16


@pytest.mark.slow
def test_twenty_steps_lower_the_total_loss(tiny_config, fixed_pairs):
    torch.manual_seed(0)
    model = SISTAModel(tiny_config)
    images, semantics = fixed_pairs
    images = model.image_encoder.normalize(images)
    tokens = model.text_encoder.tokenize(REPORTS)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4)
    losses = []
    for _ in range(20):
        out = model(images, tokens, semantics)
        optimizer.zero_grad()
        out["loss"].backward()
        optimizer.step()
        losses.append(out["loss"].item())
    assert out["fraction_negatives_eliminated"] > 0
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_save_and_load_reproduce_outputs_exactly(tiny_config, fixed_pairs, tmp_path):
    torch.manual_seed(1)
    model = SISTAModel(tiny_config).eval()
    images, semantics = fixed_pairs
    images = model.image_encoder.normalize(images[:4])
    model.save_pretrained(tmp_path)
    loaded = SISTAModel.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    with torch.no_grad():
        before = model(images, REPORTS[:4], semantics[:4])
        after = loaded(images, REPORTS[:4], semantics[:4])
    for key in ("image_embed", "text_embed", "loss"):
        assert torch.equal(before[key], after[key]), key

    encoder = ImageEncoder.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(encoder(images)["patches"], model.image_encoder(images)["patches"])


def test_truncated_checkpoint_fails_clearly(tiny_config, tmp_path):
    SISTAModel(tiny_config).save_pretrained(tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        SISTAModel.from_pretrained(tmp_path)


def test_unknown_config_key_is_named(tiny_config):
    data = tiny_config.to_dict()
    data["sia"]["treshold"] = 0.5
    with pytest.raises(ValueError, match="sia.treshold"):
        SISTAConfig.from_dict(data)
