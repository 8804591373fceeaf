"""Stage ``reports``: sections, cleaned text, finding labels and tokens for every report.

Tokenising here, once, means the training step only pads stored token ids.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm
from transformers import AutoTokenizer

from components.platform.config import Params
from components.platform.stage import stage_dir, stage_main
from components.platform.stage_storage import stage_output
from components.platform.tracking import stage_run
from sista_core.encoders.text import default_text_encoder_path, split_tokens, tokenize_texts
from sista_core.findings import OBSERVATIONS
from sista_core.reports.labeler import label_report
from sista_core.reports.sections import extract_sections

REPORTS_PER_CHUNK = 4096  # processed and written together: memory does not grow with N
REPORT_SCHEMA = pa.schema(
    [
        ("record_id", pa.string()),
        ("patient_id", pa.string()),
        ("split", pa.string()),
        ("findings", pa.string()),
        ("impression", pa.string()),
        ("section_source", pa.string()),
        ("text", pa.string()),
        ("labels", pa.list_(pa.float64())),
        ("findings_detail", pa.string()),
        ("input_ids", pa.list_(pa.int64())),
        ("word_index", pa.list_(pa.int64())),
        ("word_mask", pa.list_(pa.bool_())),
        ("words_text", pa.list_(pa.string())),
    ]
)


def process_reports(
    rows: list[dict[str, Any]], tokenizer_path: str | Any, max_length: int, batch_size: int = 256
) -> list[dict[str, Any]]:
    """One output row per report: sections, cleaned text, label vector, findings, tokens.
    ``tokenizer_path``: a tokenizer's folder, or the tokenizer itself."""
    tokenizer = (
        AutoTokenizer.from_pretrained(tokenizer_path)  # no model weights needed
        if isinstance(tokenizer_path, str)
        else tokenizer_path
    )
    processed = []
    for start in range(0, len(rows), batch_size):
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


# The text too: the similarity stage tokenises it for its own encoder when that is not
# pre-training's text model.
TOKEN_TABLE_COLUMNS = ("record_id", *TOKEN_COLUMNS, "labels", "text")


TOKENS_SCHEMA = pa.schema([REPORT_SCHEMA.field(name) for name in TOKEN_TABLE_COLUMNS])


@contextmanager
def token_table_writer(path: Path) -> Iterator[Callable[[pa.Table], None]]:
    """What pre-training and the similarity stage read of each report (its tokens, labels
    and text) as an uncompressed Arrow file: they memory-map it, so their memory does not
    grow with the reports.
    Yields ``write(reports)``, which takes tables of the reports stage's rows."""
    with pa.OSFile(str(path), "wb") as sink, pa.ipc.new_file(sink, TOKENS_SCHEMA) as writer:
        yield lambda reports: writer.write_table(
            reports.select(list(TOKEN_TABLE_COLUMNS)).cast(TOKENS_SCHEMA)
        )


def read_token_table(path: Path) -> pa.Table:
    """The table of :func:`token_table_writer`, memory-mapped (nothing is read until used)."""
    return pa.ipc.open_file(pa.memory_map(str(path))).read_all()


def run(params: Params, args: argparse.Namespace | None = None) -> dict[str, Any]:
    manifest = pq.read_table(
        stage_dir(params, "ingest") / "manifest.parquet",
        columns=["record_id", "patient_id", "split", "report"],
        filters=[("dataset", "=", "pretrain")],
    )
    tokenizer_path = params.pretrain.text.name_or_path or str(default_text_encoder_path())
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
    logged = {"reports": params.reports.model_dump(), "tokenizer": tokenizer_path}
    with (
        stage_run(params, "reports", logged=logged) as mlflow_run,
        stage_output(params, "reports", {"mlflow_run_id": mlflow_run.info.run_id}) as (out, extra),
        pq.ParquetWriter(Path(out) / "reports.parquet", REPORT_SCHEMA, compression="zstd") as table,
        token_table_writer(Path(out) / TOKENS_FILE) as write_tokens,
    ):
        counts = np.zeros(len(OBSERVATIONS), np.int64)
        for start in tqdm(
            range(0, manifest.num_rows, REPORTS_PER_CHUNK), desc="reports", unit="chunk"
        ):
            rows = manifest.slice(start, REPORTS_PER_CHUNK).to_pylist()
            processed = process_reports(rows, tokenizer, params.reports.max_length)
            chunk = pa.Table.from_pylist(processed, schema=REPORT_SCHEMA)
            table.write_table(chunk)
            write_tokens(chunk)
            counts += (np.array([row["labels"] for row in processed]) == 1.0).sum(0).astype(int)
        positives = {name: int(counts[i]) for i, name in enumerate(OBSERVATIONS)}
        extra["label_positives"] = positives
        (Path(out) / "label_counts.json").write_text(json.dumps(positives, indent=2))
        mlflow.log_metrics({"reports": float(manifest.num_rows)})
    return {"reports": manifest.num_rows}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    return stage_main("reports", run, argv)


if __name__ == "__main__":
    main()
