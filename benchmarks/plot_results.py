"""Plot benchmark results beside their JSON (matplotlib; runs anywhere, no GPU needed).

    python benchmarks/plot_results.py benchmarks/results/NVIDIA-H200/whisper.json [conformer.json ...]

whisper.json: ms per token and RTFx, turboformer vs transformers, per model and batch. conformer.json,
lite_transformer.json, sam.json: one bar chart of each family's headline (time per batch or images/s) for ours
against its baselines, per case.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def family_bars(results: dict) -> tuple[str, str, list[str], dict[str, list[float]]]:
    """(title, y label, case labels, {system: values}) of a Conformer, Lite Transformer or SAM results file."""
    if "systems" in results and "config" in results and results["rows"] and "seconds" in results["rows"][0]:
        cases = [f"b{r['batch']} {r['seconds']:g}s" for r in results["rows"]]
        bars = {s: [r[s]["total_ms"] for r in results["rows"]] for s in results["systems"]}
        return f"WeNet Conformer ({results['config']}) on {results['gpu']}", "ms per batch (encoder + rescoring)", cases, bars
    if "engines" in results:
        rows = results["rows"]
        cases = [f"b{r['batch']} len{r['src_len']} beam{r['beam']}" for r in rows]
        bars = {"fp32 eager": [r["baseline_ms"] for r in rows]}
        bars.update({f"ours {e}": [r[f"{e}_ms"] for r in rows] for e in results["engines"]})
        return f"Lite Transformer ({results['config']}) on {results['gpu']}", "ms per batch (encoder + beam search)", cases, bars
    cases, bars = [], {}
    for model, entry in results["models"].items():
        for batch, row in entry["rows"].items():
            cases.append(f"{model} b{batch}")
            for variant, value in row.items():
                if isinstance(value, dict) and "images_per_s" in value:
                    bars.setdefault(variant, []).append(value["images_per_s"])
    return f"Segment Anything image encoder on {results['device']}", "images per second", cases, bars


def plot_family(path: str, results: dict, plt) -> int:
    title, ylabel, cases, bars = family_bars(results)
    fig, ax = plt.subplots(figsize=(max(8, 1.4 * len(cases)), 4.8))
    width = 0.8 / len(bars)
    for k, (system, values) in enumerate(bars.items()):
        ax.bar([i + (k - (len(bars) - 1) / 2) * width for i in range(len(cases))], values, width, label=system)
    ax.set_xticks(range(len(cases)), cases, fontsize=8)
    ax.set_yscale("log")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)
    return 0


def main(path: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(path).read_text())
    if "peaks" not in results:  # not a Whisper results file
        return plot_family(path, results, plt)
    models = list(results["models"])
    batches = list(next(iter(results["models"].values()))["ours"]["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    width = 0.8 / (2 * len(batches))
    for ax, key, label in ((axes[0], "ms_per_token", "ms per decoded token (lower is better)"),
                           (axes[1], "rtfx", "RTFx: audio seconds per second (higher is better)")):
        for j, batch in enumerate(batches):
            for k, side in enumerate(("ours", "hf")):
                values = [results["models"][m][side]["rows"][batch][key] for m in models]
                offset = (2 * j + k - len(batches)) * width + width / 2
                ax.bar([i + offset for i in range(len(models))], values, width,
                       label=f"{'turboformer' if side == 'ours' else 'transformers'} b={batch}",
                       color=plt.cm.tab20(2 * j + k))
        ax.set_xticks(range(len(models)), models)
        ax.set_yscale("log")
        ax.set_title(label)
        ax.grid(axis="y", alpha=0.3)
    axes[1].legend(fontsize=8, ncol=2)
    fig.suptitle(f"Whisper on {results['gpu']} (fp16, random weights of the real sizes, 100 greedy tokens)")
    fig.tight_layout()
    out = Path(path).with_suffix(".png")
    fig.savefig(out, dpi=110)
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(max(main(path) for path in sys.argv[1:]))
