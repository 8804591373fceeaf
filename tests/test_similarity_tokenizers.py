"""Report semantics come from the similarity encoder's own tokenizer, whatever text model
pre-training trains (the reports stage tokenises for pre-training)."""

import json
import shutil

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from components.platform.config import ConfigError, Params, load_params
from components.stages.reports import process_reports
from components.stages.similarity import SentenceEmbedder, shares_tokens
from sista_core.encoders import TextEncoder
from sista_core.encoders.text import default_text_encoder_path

REPORTS = [
    "Heart size is normal. No pleural effusion or pneumothorax.",
    "Small left pleural effusion with adjacent atelectasis.",
    "Right upper lobe consolidation, concerning for pneumonia.",
    "Stable cardiomegaly. Mild pulmonary edema.",
]
SPECIAL_IDS = 1000  # [PAD], [UNK], [CLS], [SEP], [MASK] and unused ids stay where they are


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    """A second real tokenizer: the packaged WordPiece vocabulary with its word ids reversed,
    so the same text gets other ids (as Bio_ClinicalBERT's would differ from MiniLM's)."""
    folder = tmp_path_factory.mktemp("other-tokenizer")
    source = default_text_encoder_path()
    for name in ("tokenizer_config.json", "special_tokens_map.json", "config.json"):
        shutil.copy(source / name, folder / name)
    vocabulary = (source / "vocab.txt").read_text().splitlines()
    reordered = vocabulary[:SPECIAL_IDS] + vocabulary[SPECIAL_IDS:][::-1]
    (folder / "vocab.txt").write_text("\n".join(reordered) + "\n")
    tokenizer = json.loads((source / "tokenizer.json").read_text())
    tokenizer["model"]["vocab"] = {token: i for i, token in enumerate(reordered)}
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    return str(folder)


def stored_reports(tokenizer_path: str) -> dict[str, np.ndarray]:
    """The reports stage's rows for REPORTS, as the similarity stage's batch sees them."""
    rows = [
        {"record_id": str(i), "patient_id": str(i), "split": "train", "report": text}
        for i, text in enumerate(REPORTS)
    ]
    processed = process_reports(rows, tokenizer_path, max_length=48)
    batch = {"position": np.arange(len(processed))}
    for column in ("text", "input_ids", "word_index", "word_mask", "words_text"):
        values = np.empty(len(processed), dtype=object)
        values[:] = [row[column] for row in processed]
        batch[column] = values
    return batch


def test_semantics_with_another_training_tokenizer_equal_the_encoder_alone(other_tokenizer):
    params = Params.model_validate(
        {
            "reports": {"max_length": 48},
            "pretrain": {"text": {"name_or_path": other_tokenizer, "max_length": 48}},
        }
    )
    assert not shares_tokens(params)
    batch = stored_reports(other_tokenizer)
    packaged = TextEncoder(None, max_length=48).eval()
    assert (
        batch["input_ids"][0]
        != packaged.tokenize([batch["text"][0]]).input_ids[0][: len(batch["input_ids"][0])].tolist()
    ), "the two tokenizers must give different ids"
    with torch.inference_mode():
        alone = F.normalize(packaged.encode(list(batch["text"]))["global"], dim=-1).numpy()

    embedded = SentenceEmbedder(None, 48, 0, own_tokens=not shares_tokens(params))(batch)
    np.testing.assert_allclose(embedded["embedding"].astype(np.float32), alone, atol=2e-3)
    # What embedding the other model's ids would give: another similarity, not a rounding.
    misread = SentenceEmbedder(None, 48, 0, own_tokens=False)(batch)["embedding"]
    assert np.abs(misread.astype(np.float32) - alone).max() > 0.1


def test_the_same_model_keeps_using_the_stored_tokens():
    params = Params.model_validate({})
    assert shares_tokens(params)
    batch = stored_reports(str(default_text_encoder_path()))
    stored = SentenceEmbedder(None, 48, 0, own_tokens=False)(batch)["embedding"]
    retokenised = SentenceEmbedder(None, 48, 0, own_tokens=True)(batch)["embedding"]
    np.testing.assert_array_equal(stored, retokenised)


def test_two_token_lengths_are_a_config_error(tmp_path):
    path = tmp_path / "params.yaml"
    path.write_text("reports: {max_length: 64}\npretrain: {text: {max_length: 48}}\n")
    with pytest.raises(ConfigError, match=r"reports.max_length \(64\).*pretrain.text.max_length"):
        load_params(path)
