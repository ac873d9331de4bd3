"""The SAM accuracy report: fp32 against itself is exact; bf16 on CPU stays close; the CLI prints it."""

import numpy as np
import pytest
import torch
from PIL import Image

from turboformer.cli import main
from turboformer.eval.segmentation import evaluate_segmentation, mask_iou, point_grid


def test_mask_iou_and_grid():
    a = np.zeros((2, 4, 4), bool)
    b = np.zeros((2, 4, 4), bool)
    a[0, :2], b[0, :1] = True, True  # 8 vs 4 pixels, 4 shared
    assert mask_iou(a, b).tolist() == [0.5, 1.0]  # the second pair: both empty
    assert point_grid(100, 200, 2).tolist() == [[50.0, 25.0], [150.0, 25.0], [50.0, 75.0], [150.0, 75.0]]


def test_report_on_a_real_image(tiny_checkpoint, images, tmp_path, capsys):
    image = images["coffee"]
    exact = evaluate_segmentation(str(tiny_checkpoint), image, "cpu", torch.float32, points_per_side=2)
    assert exact.mean_iou == 1.0 and exact.logits.max_abs == 0.0 and exact.prompts == 4
    bf16 = evaluate_segmentation(str(tiny_checkpoint), image, "cpu", torch.bfloat16, points_per_side=2)
    assert bf16.logits.finite and 0 < bf16.logits.max_abs and 0.5 < bf16.mean_iou <= 1.0
    Image.fromarray(image).save(tmp_path / "coffee.png")
    assert main(["eval", "sam", str(tmp_path / "coffee.png"), "--model", str(tiny_checkpoint), "--device", "cpu",
                 "--points-per-side", "1"]) == 0
    assert "mask IoU with fp32 CPU mean 1.0000" in capsys.readouterr().out
    (tmp_path / "not-an-image.png").write_text("hello")
    assert main(["eval", "sam", str(tmp_path / "not-an-image.png"), "--model", str(tiny_checkpoint), "--device", "cpu"]) == 2


@pytest.mark.cuda
def test_report_on_the_gpu(tiny_checkpoint, images):
    report = evaluate_segmentation(str(tiny_checkpoint), images["astronaut"], "cuda", torch.bfloat16, 2)
    assert report.logits.finite and report.mean_iou >= 0.9
