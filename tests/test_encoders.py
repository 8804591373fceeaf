import os
import subprocess
import sys

import pytest
import torch

from sista_core.checkpoint import CheckpointError
from sista_core.encoders import ImageEncoder, is_masked_word
from sista_core.encoders.text import merge_pieces_into_words


@pytest.mark.parametrize(
    "name, dim, grid",
    [("resnet18", 512, (2, 2)), ("vit_tiny_patch16_224", 192, (4, 4))],
)
def test_image_encoder_contract(name, dim, grid):
    encoder = ImageEncoder(name, img_size=64).eval()
    images = encoder.normalize(torch.randint(0, 256, (2, 64, 64), dtype=torch.uint8))
    assert images.shape == (2, 3, 64, 64)
    out = encoder(images)
    assert out["global"].shape == (2, dim)
    assert out["patches"].shape == (2, grid[0] * grid[1], dim)
    assert out["grid"] == grid


def test_a_cnn_runs_channels_last_with_the_same_features_and_gradients():
    """The CNN layout is a speed choice only: the plain NCHW backbone gives the same maps and
    the same gradients (float32 kernels that sum in another order: about 1e-4 apart)."""
    torch.manual_seed(0)
    encoder = ImageEncoder("efficientnet_lite0", img_size=64).eval()
    images = torch.randn(2, 3, 64, 64)
    plain = encoder.backbone.forward_features(images.contiguous())
    assert plain.is_contiguous()  # the reference really ran without channels-last
    expected = plain.permute(0, 2, 3, 1).flatten(1, 2)
    layouts = []
    encoder.backbone.conv_stem.register_forward_pre_hook(
        lambda _, inputs: layouts.append(inputs[0].is_contiguous(memory_format=torch.channels_last))
    )
    out = encoder(images)["patches"]
    assert layouts == [True]
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
    weights = torch.randn_like(out)
    gradients = []
    for patches in (out, expected):
        encoder.zero_grad()
        (patches * weights).sum().backward()
        gradients.append(encoder.backbone.conv_stem.weight.grad.clone())
    torch.testing.assert_close(*gradients, rtol=1e-3, atol=1e-3 * gradients[1].abs().max().item())
    assert [level.shape[1] for level in encoder.pyramid(images, 4)] == [24, 40, 112, 320]


def test_image_encoder_loads_a_local_weight_file_and_rejects_a_truncated_one(tmp_path):
    from safetensors.torch import save_model

    source = ImageEncoder("resnet18", img_size=64).eval()
    weights = tmp_path / "resnet18.safetensors"
    save_model(source.backbone, str(weights))
    loaded = ImageEncoder("resnet18", img_size=64, checkpoint=weights).eval()
    images = torch.randn(1, 3, 64, 64)
    assert torch.equal(source(images)["global"], loaded(images)["global"])

    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match="resnet18.safetensors"):
        ImageEncoder("resnet18", img_size=64, checkpoint=weights)


def test_image_encoder_rejects_weights_of_another_architecture(tmp_path):
    from safetensors.torch import save_model

    weights = tmp_path / "resnet18.safetensors"
    save_model(ImageEncoder("resnet18", img_size=64).backbone, str(weights))
    with pytest.raises(CheckpointError, match="different architecture"):
        ImageEncoder("resnet34", img_size=64, checkpoint=weights)


def test_word_pieces_are_averaged_into_words():
    pieces = torch.tensor([[[0.0], [2.0], [4.0], [10.0], [0.0]]])  # CLS, w0, w0, w1, SEP
    word_index = torch.tensor([[-1, 0, 0, 1, -1]])
    words = merge_pieces_into_words(pieces, word_index, num_words=3)
    assert words[0, :, 0].tolist() == [3.0, 10.0, 0.0]


def test_masked_words():
    assert is_masked_word("XXXX") and is_masked_word(".") and is_masked_word("-")
    assert not is_masked_word("effusion") and not is_masked_word("x") and not is_masked_word("2")


def test_text_encoder_outputs_words_with_masks(text_encoder):
    texts = ["Mild cardiomegaly. XXXX-year-old with pneumothorax.", "No acute disease"]
    out = text_encoder.encode(texts)
    assert out["global"].shape == (2, 384)
    assert out["words_text"][0] == [
        "Mild",
        "cardiomegaly",
        ".",
        "XXXX",
        "-",
        "year",
        "-",
        "old",
        "with",
        "pneumothorax",
        ".",
    ]
    assert out["words"].shape == (2, 11, 384)
    assert out["word_mask"][0].tolist() == [
        True,
        True,
        False,
        False,
        False,
        True,
        False,
        True,
        True,
        True,
        False,
    ]
    assert out["word_mask"][1].tolist() == [True, True, True] + [False] * 8
    # "cardiomegaly" spans several word pieces yet is one word
    tokens = text_encoder.tokenize(texts[:1])
    assert (tokens.word_index[0] == 1).sum() > 1


def test_text_encoder_freezes_the_requested_layers():
    from sista_core.encoders import TextEncoder

    encoder = TextEncoder(freeze_layers=2)
    layers = encoder.model.encoder.layer
    assert not any(p.requires_grad for p in encoder.model.embeddings.parameters())
    assert not any(p.requires_grad for p in layers[1].parameters())
    assert all(p.requires_grad for p in layers[2].parameters())


@pytest.mark.slow
def test_default_text_encoder_loads_with_the_network_unavailable():
    env = dict(
        os.environ,
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HTTPS_PROXY="http://127.0.0.1:9",
        HTTP_PROXY="http://127.0.0.1:9",
    )
    code = (
        "from sista_core.encoders import TextEncoder;"
        "out = TextEncoder().encode(['No acute cardiopulmonary disease.']);"
        "print(tuple(out['global'].shape))"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("(1, 384)")


def test_stored_tokens_collate_back_to_the_same_batch(text_encoder):
    from sista_core.encoders.text import collate_tokens, split_tokens

    texts = ["Small left effusion.", "No acute cardiopulmonary disease. XXXX stable."]
    tokens = text_encoder.tokenize(texts)
    again = collate_tokens(split_tokens(tokens), text_encoder.tokenizer.pad_token_id)
    for name in ("input_ids", "attention_mask", "word_index", "word_mask"):
        assert torch.equal(getattr(tokens, name), getattr(again, name)), name
    assert again.words_text == tokens.words_text


def test_cached_frozen_states_give_the_same_outputs_and_gradients():
    """Training on stored frozen-layer states (zero-padded per batch) is the full forward."""
    from sista_core.encoders import TextEncoder
    from sista_core.encoders.text import collate_tokens, split_tokens

    encoder = TextEncoder(freeze_layers=4, max_length=64).train()
    assert not encoder.model.encoder.layer[3].training  # frozen layers: no dropout
    texts = ["Small left effusion.", "Heart size normal. XXXX granuloma in the right upper lobe."]
    tokens = encoder.tokenize(texts)
    records = split_tokens(tokens)
    for record, states in zip(records, encoder.frozen_states(tokens), strict=True):
        record["frozen_states"] = states[: len(record["input_ids"])].numpy()
    cached = collate_tokens(records, encoder.tokenizer.pad_token_id)
    assert cached.frozen_states.shape == (2, tokens.input_ids.shape[1], 384)

    outputs = []
    for batch in (tokens, cached):
        encoder.zero_grad()
        torch.manual_seed(0)  # the same dropout in the trainable layers
        out = encoder(batch)
        (out["global"].sum() + out["words"].sum()).backward()
        grad = encoder.model.encoder.layer[5].output.dense.weight.grad.clone()
        outputs.append((out["global"].detach(), out["words"].detach(), grad))
    for full, from_cache in zip(*outputs, strict=True):
        torch.testing.assert_close(from_cache, full, atol=1e-5, rtol=1e-5)
