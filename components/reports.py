"""Stage ``reports``: sections, cleaned text, finding labels and tokens for every report.

Tokenising here, once, means the training step only pads stored token ids.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import mlflow
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm
from transformers import AutoTokenizer

from sista_core.encoders.text import default_text_encoder_path, split_tokens, tokenize_texts
from sista_core.findings import OBSERVATIONS
from sista_core.reports.labeler import label_report
from sista_core.reports.sections import extract_sections

from .config import Params
from .stage import stage_dir, stage_main
from .stage_storage import stage_output
from .tracking import stage_run


def process_reports(
    rows: list[dict[str, Any]], tokenizer_path: str, max_length: int, batch_size: int = 256
) -> list[dict[str, Any]]:
    """One output row per report: sections, cleaned text, label vector, findings, tokens."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)  # no model weights needed
    processed = []
    for start in tqdm(range(0, len(rows), batch_size), desc="reports", unit="batch"):
        chunk = rows[start : start + batch_size]
        sections = [extract_sections(row["report"]) for row in chunk]
        texts = [s.text for s in sections]
        tokens = split_tokens(tokenize_texts(tokenizer, texts, max_length))
        for row, section, text, token_record in zip(chunk, sections, texts, tokens, strict=True):
            labels = label_report(text)
            processed.append(
                {
                    "record_id": row["record_id"],
                    "patient_id": row["patient_id"],
                    "split": row["split"],
                    "findings": section.findings,
                    "impression": section.impression,
                    "section_source": section.source,
                    "text": text,
                    "labels": labels.vector(OBSERVATIONS).tolist(),
                    "findings_detail": json.dumps([f.__dict__ for f in labels.findings]),
                    **token_record,
                }
            )
    return processed


TOKEN_COLUMNS = ("input_ids", "word_index", "word_mask", "words_text")
TOKENS_FILE = "tokens.arrow"


def write_token_table(reports: pa.Table, path: Path) -> None:
    """What pre-training reads of each report (its tokens and labels) as an uncompressed
    Arrow file: workers memory-map it, so their memory does not grow with the reports."""
    table = reports.select(["record_id", *TOKEN_COLUMNS, "labels"])
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table)


def read_token_table(path: Path) -> pa.Table:
    """The table of :func:`write_token_table`, memory-mapped (nothing is read until used)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    manifest = pq.read_table(stage_dir(params, "ingest") / "manifest.parquet")
    rows = [row for row in manifest.to_pylist() if row["dataset"] == "pretrain"]
    tokenizer_path = params.pretrain.text.name_or_path or str(default_text_encoder_path())
    logged = {"reports": params.reports.model_dump(), "tokenizer": tokenizer_path}
    with (
        stage_run(params, "reports", logged=logged) as mlflow_run,
        stage_output(params, "reports", {"mlflow_run_id": mlflow_run.info.run_id}) as (out, extra),
    ):
        processed = process_reports(rows, tokenizer_path, params.reports.max_length)
        table = pa.Table.from_pylist(processed)
        pq.write_table(table, Path(out) / "reports.parquet", compression="zstd")
        write_token_table(table, Path(out) / TOKENS_FILE)
        positives = {
            name: sum(1 for row in processed if row["labels"][i] == 1.0)
            for i, name in enumerate(OBSERVATIONS)
        }
        extra["label_positives"] = positives
        (Path(out) / "label_counts.json").write_text(json.dumps(positives, indent=2))
        mlflow.log_metrics({"reports": float(len(processed))})
    return {"reports": len(processed)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("reports", run, argv)


if __name__ == "__main__":
    main()
