"""Plot bench_whisper.py results: ms per token and RTFx, turboformer vs transformers, per model and batch.

    python benchmarks/plot_results.py benchmarks/results/NVIDIA-H200/whisper.json
Writes the PNG beside the JSON (matplotlib; runs anywhere, no GPU needed).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def main(path: str) -> int:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = json.loads(Path(path).read_text())
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
    sys.exit(main(sys.argv[1]))
