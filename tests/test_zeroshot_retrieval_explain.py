from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from pipeline.cli import main as sista
from sista_core import SISTAConfig, SISTAModel
from sista_core.config import ImageConfig, TextConfig
from sista_core.explain import (
    attention_mass_in_mask,
    explain_png,
    focal_report,
    localisation_rate,
    word_attention,
)
from sista_core.findings import CHEXPERT_COMPETITION, Finding
from sista_core.probe import macro_auroc
from sista_core.retrieval import recall_at_k
from sista_core.zeroshot import PROMPTS, zero_shot_logits

REPORT = "Small left pleural effusion. XXXX catheter in place."


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    config = SISTAConfig(
        image=ImageConfig(name="vit_tiny_patch16_224", img_size=64),
        text=TextConfig(max_length=32),
        embed_dim=32,
    )
    return SISTAModel(config).eval()


@pytest.fixture(scope="module")
def saved_model(tiny_model, tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    tiny_model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def image():
    return np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8)


def test_identity_pairs_are_always_retrieved_first():
    recall = recall_at_k(torch.eye(4), torch.eye(4), ks=(1, 5))
    assert set(recall.values()) == {1.0}
    assert set(recall) == {
        "image_to_text_recall_at_1",
        "image_to_text_recall_at_5",
        "text_to_image_recall_at_1",
        "text_to_image_recall_at_5",
    }


def test_shifted_pairs_rank_second():
    # Text i is image i + 1's vector: every query's partner is beaten by exactly one candidate.
    recall = recall_at_k(torch.eye(4), torch.eye(4).roll(-1, dims=0), ks=(1, 2))
    assert recall["image_to_text_recall_at_1"] == recall["text_to_image_recall_at_1"] == 0.0
    assert recall["image_to_text_recall_at_2"] == recall["text_to_image_recall_at_2"] == 1.0


def test_graded_similarities_give_hand_computed_recall():
    # With identity images, similarity[i, j] = text_emb[j, i]; image i's partner ranks i-th.
    similarity = torch.tensor(
        [
            [0.9, 0.1, 0.0, 0.0],
            [0.8, 0.5, 0.0, 0.0],
            [0.7, 0.6, 0.4, 0.0],
            [0.3, 0.2, 0.1, 0.0],
        ]
    )
    recall = recall_at_k(torch.eye(4), similarity.T, ks=(1, 2, 3))
    assert [recall[f"image_to_text_recall_at_{k}"] for k in (1, 2, 3)] == [0.25, 0.5, 0.75]
    # Text columns: partner ranks 0, 1 (0.6 > 0.5), 0, and 0 (all tied at 0: ties count for it).
    assert [recall[f"text_to_image_recall_at_{k}"] for k in (1, 2)] == [0.75, 1.0]


def test_pretrain_validation_keeps_its_metric_names(tiny_model, image):
    from components.stages.pretrain import retrieval_recall
    from sista_core.encoders.text import split_tokens

    class HeldOutPairs:  # what retrieval_recall reads of a PretrainData
        images = np.stack([image, 255 - image, image // 2])
        tokens = split_tokens(
            tiny_model.text_encoder.tokenize([REPORT, "No acute disease.", "Right pneumothorax."])
        )

        def __len__(self):
            return 3

    metrics = retrieval_recall(tiny_model, HeldOutPairs(), ks=(1, 5), batch_size=2)
    assert set(metrics) == {
        "val_recall_at_1",
        "val_recall_at_5",
        "val_text_to_image_recall_at_1",
        "val_text_to_image_recall_at_5",
    }
    assert metrics["val_recall_at_5"] == metrics["val_text_to_image_recall_at_5"] == 1.0


class RiggedModel(torch.nn.Module):
    """Embeds finding c's positive prompts as +e_c and its negative ones as -e_c, and an image
    as the normalised sum of e_c over the findings marked in its first pixel row."""

    def __init__(self) -> None:
        super().__init__()
        self.image_encoder = SimpleNamespace(normalize=lambda images: images.float())
        self.prompt_vectors = {}
        for column, (positive, negative) in enumerate(PROMPTS[f] for f in CHEXPERT_COMPETITION):
            axis = F.one_hot(torch.tensor(column), len(CHEXPERT_COMPETITION)).float()
            self.prompt_vectors |= {p: axis for p in positive} | {p: -axis for p in negative}

    def encode_text(self, texts):
        return {"global": torch.stack([self.prompt_vectors[t] for t in texts])}

    def encode_image(self, images):
        marks = (images[:, 0, : len(CHEXPERT_COMPETITION)] > 0).float()
        return {"global": F.normalize(marks, dim=-1)}


def test_every_competition_finding_has_positive_and_negative_prompts():
    assert set(PROMPTS) == set(CHEXPERT_COMPETITION)
    for positive, negative in PROMPTS.values():
        assert positive and negative and not set(positive) & set(negative)


def test_rigged_embeddings_rank_each_finding_perfectly():
    labels = torch.tensor(
        [[1, 0, 0, 1, 0], [0, 1, 0, 0, 0], [0, 0, 1, 1, 1], [0, 0, 0, 0, 0], [1, 1, 1, 0, 1]]
    ).float()
    images = torch.zeros(5, 8, 8, dtype=torch.uint8)
    images[:, 0, :5] = (labels * 255).to(torch.uint8)
    logits = zero_shot_logits(RiggedModel(), images, batch_size=2)
    assert torch.equal(logits > 0, labels.bool())
    assert macro_auroc(logits, labels)[0] == 1.0
    subset = zero_shot_logits(RiggedModel(), images, ("Edema", "Atelectasis"))
    assert torch.equal(subset, logits[:, [3, 0]])


def test_zero_shot_logits_of_a_real_model_are_one_finite_column_per_finding(tiny_model, image):
    images = torch.from_numpy(np.stack([image, 255 - image, image // 2]))
    logits = zero_shot_logits(tiny_model, images)
    assert logits.shape == (3, len(CHEXPERT_COMPETITION))
    assert torch.isfinite(logits).all()
    # Each column is a difference of two cosines.
    assert logits.abs().max() <= 2.0


def test_attention_mass_in_mask_on_a_hand_made_map():
    attention = torch.tensor([[0.5, 0.5], [0.0, 0.0]])  # 2 x 2 patches over a 4 x 4 image
    top_left = np.zeros((4, 4), dtype=bool)
    top_left[:2, :2] = True
    assert attention_mass_in_mask(attention, top_left) == 0.5
    top_half = np.zeros((4, 4), dtype=bool)
    top_half[:2] = True
    assert attention_mass_in_mask(attention, top_half) == 1.0
    corner_pixel = np.zeros((4, 4), dtype=bool)
    corner_pixel[0, 0] = True  # a quarter of the top-left patch
    assert attention_mass_in_mask(attention, corner_pixel) == 0.125
    assert attention_mass_in_mask(torch.ones(2, 2), top_left) == top_left.mean()
    assert attention_mass_in_mask(torch.zeros(2, 2), top_left) == 0.0


def test_word_attention_is_sparse_per_word_and_matches_training_forward(tiny_model, image):
    words, attention = word_attention(tiny_model, image, REPORT)
    assert words == ["Small", "left", "pleural", "effusion", "catheter", "in", "place"]
    assert attention.shape == (7, 4, 4)  # 64 px / 16 px patches
    assert torch.allclose(attention.sum((1, 2)), torch.ones(7), atol=1e-5)
    assert (attention >= 0).all() and (attention == 0).any()  # sparsemax: exact zeros
    with torch.no_grad():
        pixels = tiny_model.image_encoder.normalize(torch.from_numpy(image)[None])
        forward = tiny_model(pixels, [REPORT], torch.ones(1, 8), return_attention=True)
    word_mask = tiny_model.text_encoder.tokenize([REPORT]).word_mask[0]
    assert torch.allclose(forward["attention"][0][word_mask].view(7, 4, 4), attention)


def test_word_attention_rejects_an_image_of_the_wrong_size(tiny_model):
    with pytest.raises(ValueError, match=r"\(64, 64\)"):
        word_attention(tiny_model, np.zeros((96, 96), np.uint8), REPORT)


def test_explain_png_writes_the_chosen_or_most_concentrated_words(tiny_model, image, tmp_path):
    shown = explain_png(tiny_model, image, REPORT, tmp_path / "default.png")
    assert len(shown) == 4 and set(shown) <= set(REPORT.replace(".", "").split())
    assert (tmp_path / "default.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert explain_png(tiny_model, image, REPORT, tmp_path / "one.png", ["Effusion"]) == [
        "effusion"
    ]
    with pytest.raises(ValueError, match="'edema' is not a word"):
        explain_png(tiny_model, image, REPORT, tmp_path / "bad.png", ["edema"])


def test_focal_report_names_side_and_finding():
    assert focal_report(Finding("Pneumothorax", side="left")) == "Left pneumothorax."
    assert focal_report(Finding("Nodule", side="bilateral")) == "Bilateral lung nodule."


def test_localisation_rate_summarises_rendered_phantoms(tiny_model):
    result = localisation_rate(tiny_model, num_images=2, seed=3, size=96)
    assert result["num_images"] == 2
    assert 0.0 <= result["rate"] <= 1.0
    assert 0.0 < result["mean_uniform_mass"] < 0.5  # focal findings cover a small area
    assert result["per_finding"]["Pneumothorax"]["num_images"] == 1
    assert result["per_finding"]["Nodule"]["num_images"] == 1
    assert 0.0 < result["uniform_pointing"] < 0.5 and result["pointing_game"] in (0.0, 0.5, 1.0)


def test_the_pointing_game_hits_when_the_top_patch_overlaps_the_mask():
    from sista_core.explain import points_inside

    mask = np.zeros((8, 8), bool)
    mask[0:3, 0:3] = True  # overlaps the top-left 2 x 2 patches of a 4 x 4 grid
    attention = torch.zeros(4, 4)
    attention[1, 1] = 0.9
    assert points_inside(attention, mask) == (True, 4 / 16)
    attention[1, 1], attention[3, 3] = 0.1, 0.9
    assert points_inside(attention, mask) == (False, 4 / 16)
    assert points_inside(torch.zeros(4, 4), mask)[0] is False  # a map pointing nowhere


def test_cli_explain_writes_a_png(saved_model, tmp_path, capsys):
    image_path = tmp_path / "film.png"
    Image.fromarray(np.full((80, 100), 128, np.uint8)).save(image_path)
    out = tmp_path / "heat.png"
    args = ["explain", str(image_path), REPORT, "--model", str(saved_model), "--out", str(out)]
    with pytest.raises(SystemExit) as exit_:
        sista([*args, "--words", "left,effusion"])
    assert exit_.value.code == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
    assert "left, effusion" in capsys.readouterr().out


@pytest.mark.parametrize("missing", ["image", "model"])
def test_cli_explain_names_a_missing_path(saved_model, tmp_path, capsys, missing):
    image_path = tmp_path / "film.png"
    if missing == "model":
        Image.fromarray(np.zeros((64, 64), np.uint8)).save(image_path)
    model = tmp_path / "no_model" if missing == "model" else saved_model
    with pytest.raises(SystemExit) as exit_:
        sista(["explain", str(image_path), REPORT, "--model", str(model)])
    assert exit_.value.code == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1
    assert str(image_path if missing == "image" else model) in error


def test_localisation_rate_counts_hits_and_misses_of_hand_made_maps(monkeypatch):
    """Stand-in phantoms (the mask: the top-left 2 x 2 patches of a 4 x 4 grid, a quarter of
    the image) and stand-in attention maps whose hits and misses are known."""
    import sista_core.explain as explain

    mask = np.zeros((8, 8), bool)
    mask[:4, :4] = True

    def grid(weights):  # {(row, column): weight} on the 4 x 4 patches, 0 elsewhere
        attention = torch.zeros(4, 4)
        for patch, weight in weights.items():
            attention[patch] = weight
        return attention

    bump = torch.full((4, 4), 1 / 16)
    bump[2, 2] += 0.01  # near uniform, peak outside: mass 0.25 / 1.01, under the chance 0.25
    maps = iter(
        [
            grid({(0, 0): 1.0}),  # Pneumothorax: all inside; mass hit, majority, pointing hit
            grid({(3, 3): 1.0}),  # Nodule: all outside; misses
            grid({(0, 0): 0.4, (3, 3): 0.6}),  # Mass: mass 0.4 > 0.25 a hit; peak outside
            torch.zeros(4, 4),  # Consolidation: points nowhere; misses
            bump,  # Lung Opacity: misses
            # image 5 (Pneumothorax) draws nothing: left out
            grid({(1, 1): 0.6, (2, 3): 0.4}),  # Nodule: mass 0.6 hit, majority, pointing hit
        ]
    )

    def render(findings, seed, size):
        drawn = {} if seed == 5 else {findings[0].observation: mask}
        finding = Finding(findings[0].observation, side="left")
        return SimpleNamespace(
            image=np.zeros((size, size), np.uint8), masks=drawn, findings=[finding]
        )

    def word_attention(model, image, report):
        words = report.rstrip(".").lower().split()
        return words, next(maps).expand(len(words), 4, 4)

    monkeypatch.setattr(explain, "render", render)
    monkeypatch.setattr(explain, "word_attention", word_attention)
    model = SimpleNamespace(image_encoder=SimpleNamespace(config=SimpleNamespace(img_size=8)))
    result = explain.localisation_rate(model, num_images=7)
    masses = [1.0, 0.0, 0.4, 0.0, 0.25 / 1.01, 0.6]
    assert result["num_images"] == 6
    assert result["rate"] == pytest.approx(3 / 6)
    assert result["majority_rate"] == pytest.approx(2 / 6)
    assert result["pointing_game"] == pytest.approx(2 / 6)
    assert result["mean_mass_in_mask"] == pytest.approx(sum(masses) / 6)
    assert result["mean_uniform_mass"] == pytest.approx(0.25)
    assert result["uniform_pointing"] == pytest.approx(0.25)
    assert result["uniform_majority_rate"] == 0.0
    per_finding = {
        name: (found["num_images"], found["rate"], found["pointing_game"])
        for name, found in result["per_finding"].items()
    }
    assert per_finding == {
        "Pneumothorax": (1, 1.0, 1.0),
        "Nodule": (2, 0.5, 0.5),
        "Mass": (1, 1.0, 0.0),
        "Consolidation": (1, 0.0, 0.0),
        "Lung Opacity": (1, 0.0, 0.0),
    }
