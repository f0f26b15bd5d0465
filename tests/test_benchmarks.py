"""The benchmark's measurement of our step still runs against the current API (a benchmark that errors measures
nothing): one eager fp32 mode with a tiny time budget. Speeds are never asserted here (benchmarks/ holds them)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))

from bench_ours import bench_mode  # noqa: E402
from bench_report import targets  # noqa: E402
from bench_timing import Budget  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def test_our_rows_measure_without_error():
    result = bench_mode("fp32", False, 1, Budget(seconds=0.03, repeats=1, warmup=1), 0.01)
    assert "error" not in result, result.get("error")
    for row in ("train", "train_no_aug", "train_no_aug_no_dropout", "infer"):
        assert result[row]["mean"] > 0, row


def test_the_targets_read_a_results_file():
    rate = {"mean": 100.0, "std": 1.0, "other_cores": 0.0}
    ours = {"precision": "fp32", "train": rate, "train_no_aug": rate, "train_no_aug_no_dropout": rate, "infer": rate}
    peer = {"modes": {"fp32": {"train": {**rate, "mean": 50.0}, "infer": {**rate, "mean": 200.0}}}}
    results = {"ours": {"fp32": ours}, "peers": {"lucidrains": peer, "timm": peer}}
    summary = {"modes": {"fp32": {"pct_of_mm_peak": 30.0}}, "mm_peak_gflops": {"fp32": 100.0, "bf16": 500.0}}
    found = {what: (value, goal) for what, value, goal in targets(results, summary)}
    assert found["fp32: train, ours without dropout / g-mlp-pytorch"] == (2.0, 1.3)
    assert found["fp32: infer, ours / timm"] == (0.5, 1.5)
    assert found["fp32 CLI step: % of the fp32 mm peak (best mode)"] == (30.0, 40.0)


def test_the_gpu_benchmark_runs_its_smoke_scale_on_a_cpu(tmp_path):
    import json

    from bench_gpu import main

    out = tmp_path / "gpu.json"
    assert main(["--smoke", "--out", str(out), "--sections", "steps-32", "--seconds", "0.02"]) == 0
    results = json.loads(out.read_text())
    rows = results["steps-32"]
    ours = {k: v for k, v in rows.items() if k.startswith("ours ")}
    assert {"ours CLI step fp32 graphs", "ours no aug bf16 graphs", "ours CLI step fp32 eager"} <= ours.keys()
    assert all(row["img_s"] > 0 for row in ours.values())
    # The peers are measured where benchmarks/setup_peers.sh installed them; elsewhere (CI) the row says why not.
    for peer in ("timm fp32", "lucidrains bf16"):
        assert rows[peer].get("img_s", 0) > 0 or "ModuleNotFoundError" in rows[peer]["error"], rows[peer]


def test_the_gpu_targets_read_a_results_file():
    from bench_gpu import targets

    rows = {
        "ours no aug bf16 graphs": {"img_s": 260.0},
        "timm fp32": {"img_s": 200.0},
        "lucidrains bf16": {"img_s": 100.0},
    }
    results = {
        "epoch": {"fp32 eager": {"epoch_s": [2.0, 2.1]}, "bf16 graphs": {"epoch_s": [0.7, 0.65]}},
        "steps-128": {**rows, "ours CLI step fp32 eager": {"error": "x"}},
        "gmlp-s": {"ours compile+graphs": {"img_s": 140.0}, "timm gmlp_s16_224 compile": {"img_s": 100.0}},
        "accuracy": {"fp32 eager": {"mean_top1": 0.50}, "bf16 compile+graphs": {"mean_top1": 0.488}},
    }
    found = {what: (round(value, 3), met) for what, value, _, met in targets(results)}
    assert found == {
        "seed epoch through train(), s (bf16 graphs)": (0.65, False),
        "batch 128: our best mode / the best peer's": (1.3, True),
        "gMLP-S 224 px bf16: ours / timm compiled": (1.4, False),
        "seed 5 epochs: |fastest - fp32| top-1, points": (1.2, False),
    }
