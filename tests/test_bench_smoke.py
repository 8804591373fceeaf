"""Each benchmark of ``make bench`` at tiny sizes: it runs and produces its rows and tables.

Not timing tests (the figures at these sizes mean nothing); ``make bench`` gives the figures.
"""

import json
from pathlib import Path

import pytest
import torch

from bench import data_loading, pretrain_scaling, run_all

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def in_repo_root(monkeypatch):
    monkeypatch.chdir(REPO)  # the benchmarks read params.yaml like the stages do


@pytest.fixture(scope="module")
def results_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("bench-results")


@pytest.fixture(scope="module")
def loading_section(results_dir) -> dict:
    return run_all.run_data_loading(True, results_dir / "data_loading.json")


@pytest.fixture(scope="module")
def pretrain_section(results_dir) -> dict:
    return run_all.run_pretrain(True, results_dir / "pretrain_scaling.json")


def test_data_loading_compares_shards_with_jpeg_decoding(loading_section, results_dir):
    rows = loading_section["data"]
    assert [r["workers"] for r in rows] == [1, 2]
    for row in rows:
        assert row["shard_images_per_s"] > 0 and row["jpeg_images_per_s"] > 0
        assert row["speedup"] == pytest.approx(row["shard_images_per_s"] / row["jpeg_images_per_s"])
    assert json.loads((results_dir / "data_loading.json").read_text())["rows"] == rows
    assert len(loading_section["rows"]) == 2


def test_data_loading_needs_two_batches():
    with pytest.raises(SystemExit):
        data_loading.main(["--images", "8", "--batch", "8", "--out", "/dev/null"])


@pytest.mark.slow
def test_pretrain_scaling_times_one_and_two_workers(pretrain_section):
    rows = {r["config"]: r for r in pretrain_section["data"]}
    assert set(rows) == {"1x1", "2x1"}
    assert rows["1x1"]["speedup"] == pytest.approx(1.0)
    assert rows["2x1"]["global_batch"] == 2 * rows["1x1"]["global_batch"]
    assert rows["2x1"]["efficiency"] == pytest.approx(rows["2x1"]["speedup"] / 2)
    for row in rows.values():
        phases = sum(row[f"{name}_s"] for name in pretrain_scaling.PHASES)
        assert phases == pytest.approx(row["step_s"], rel=0.05)  # the phases cover the step
        assert row["loss_s"] > 0 and row["samples_per_s"] > 0


def write_stage(root: Path, folder: str, seconds: float) -> None:
    (root / folder).mkdir(parents=True)
    (root / folder / "_stage.json").write_text(json.dumps({"seconds": seconds}))


def test_stage_times_read_every_stage_and_pretrain_variant(tmp_path):
    write_stage(tmp_path, "ingest", 30.0)
    write_stage(tmp_path, "pretrain/sista", 60.0)
    write_stage(tmp_path, "pretrain/convirt", 10.0)
    section = run_all.stage_times(tmp_path)
    seconds = {e["stage"]: e["seconds"] for e in section["data"]}
    assert seconds == {
        "ingest": 30.0,
        "reports": None,
        "similarity": None,
        "pretrain/convirt": 10.0,
        "pretrain/sista": 60.0,
        "evaluate": None,
        "publish": None,
    }
    cells = {row[0]: row for row in section["rows"]}
    assert cells["reports"][1] == "not run"
    assert cells["pretrain/sista"][3] == "60%"


@pytest.mark.slow
def test_run_all_writes_markdown_and_json(tmp_path, results_dir, loading_section, pretrain_section):
    write_stage(tmp_path / "data", "ingest", 12.5)
    results = run_all.main(
        [
            "--only",
            "losses,similarity",
            "--quick",
            "--data-root",
            str(tmp_path / "data"),
            "--out-dir",
            str(tmp_path),
            "--results-dir",
            str(results_dir),
        ]
    )
    assert set(results["benchmarks"]) == {"losses", "similarity", "end_to_end"}
    assert json.loads((tmp_path / "results.json").read_text())["machine"]["cpu"]
    markdown = (tmp_path / "results.md").read_text()
    assert "## Loss" in markdown and "## Similarity cache" in markdown
    assert "| ingest | 12.5 s |" in markdown and "| reports | not run |" in markdown
    assert "torch " in markdown and "ray " in markdown
    # The sections of the other benchmarks render too (one table each, ratios filled in).
    sections = {"data_loading": loading_section, "pretrain_scaling": pretrain_section}
    rendered = run_all.render_markdown(results["machine"], sections)
    assert rendered.count("\n## ") == 2 and "Time per step by phase" in rendered
    assert "x |" in rendered


def test_gpu_benchmark_runs_its_configurations_on_the_cpu_too(tmp_path):
    # Prepared for a lent GPU machine; here only the plumbing (the GPU options are no-ops).
    from bench import gpu_pretrain

    rows = gpu_pretrain.main(
        ["--device", "cpu", "--image", "vit_tiny_patch16_224", "--img-size", "32"]
        + ["--batch", "2", "--steps", "1", "--warmup", "0"]
        + ["--configs", "fp32,bf16 + channels-last"]
        + ["--out", str(tmp_path / "gpu.json")]
    )
    assert [r["configuration"] for r in rows] == ["fp32", "bf16 + channels-last"]
    assert rows[0]["speedup"] == 1.0 and rows[1]["samples_per_s"] > 0
    saved = json.loads((tmp_path / "gpu.json").read_text())
    assert saved["device"] == "cpu" and saved["peak_bf16_tflops"] is None
    assert saved["flops_per_step"] > 1e8  # counted: MiniLM alone is ~1 GFLOP per report
    assert all(r["model_tflops_per_s"] > 0 and r["mfu"] is None for r in rows)


def test_gpu_check_names_the_peak_of_known_gpus_and_skips_without_one(capsys):
    from bench import gpu_pretrain

    assert gpu_pretrain.bf16_peak_flops("NVIDIA H200") == 989e12
    assert gpu_pretrain.bf16_peak_flops("NVIDIA A100-SXM4-80GB") == 312e12
    assert gpu_pretrain.bf16_peak_flops("Some Future GPU") is None
    if not torch.cuda.is_available():
        assert gpu_pretrain.main(["--skip-without-gpu"]) == []
        assert "gpu-check skipped: no CUDA device" in capsys.readouterr().out
