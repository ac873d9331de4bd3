"""benchmarks/plot_results.py reads every family's committed results file into bars of equal length, and the
Whisper/family plots render (matplotlib Agg) beside a copy of the JSON."""

import importlib.util
import json
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "NVIDIA-H200"


def load_plotter():
    spec = importlib.util.spec_from_file_location("plot_results", ROOT / "benchmarks" / "plot_results.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name, systems", [
    ("conformer", {"ours", "fp32_eager", "torch_fp16_eager"}),
    ("lite_transformer", {"fp32 eager", "ours float16"}),
    ("sam", {"ours_bf16", "upstream_fp32"}),
])  # fmt: skip
def test_family_results_become_bars(name, systems, tmp_path):
    plotter = load_plotter()
    results = json.loads((RESULTS / f"{name}.json").read_text())
    title, ylabel, cases, bars = plotter.family_bars(results)
    assert systems <= set(bars) and cases
    assert all(len(values) == len(cases) and min(values) > 0 for values in bars.values())
    copy = tmp_path / f"{name}.json"
    shutil.copy(RESULTS / f"{name}.json", copy)
    assert plotter.main(str(copy)) == 0 and copy.with_suffix(".png").stat().st_size > 10_000
