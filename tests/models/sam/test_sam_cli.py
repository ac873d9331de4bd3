"""``turboformer segment``: writes the mask and overlay PNGs; bad input -> one stderr line, status 1.

The prompted mask written by the CLI is compared with upstream ``SamPredictor`` on the same
checkpoint (the small 256-frame model, to keep each run cheap).
"""

import argparse

import numpy as np
import pytest
import torch
from PIL import Image

from turboformer.models.sam.cli import add_parser


def run(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="turboformer")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["segment", *argv])
    return args.func(args)


@pytest.fixture(scope="module")
def photo(tmp_path_factory, images):
    path = tmp_path_factory.mktemp("photos") / "chelsea.png"
    Image.fromarray(images["chelsea_portrait"]).save(path)  # 300 wide, 451 high
    return path


def test_prompted_mask_matches_upstream(photo, small_checkpoint, small_upstream_model, upstream, tmp_path, capsys):
    out = tmp_path / "out" / "mask.png"
    argv = [str(photo), "--model", str(small_checkpoint), "--point", "150,200", "--label", "1",
            "--point", "40,400", "--label", "0", "--box", "20,30,280,430", "--multimask", "-o", str(out),
            "--device", "cpu"]
    assert run(argv) == 0
    assert "mask 2:" in capsys.readouterr().out

    image = np.asarray(Image.open(photo).convert("RGB"))
    reference = upstream.predictor.SamPredictor(small_upstream_model)
    reference.set_image(image)
    masks, iou, _ = reference.predict(point_coords=np.array([[150, 200], [40, 400]]), point_labels=np.array([1, 0]),
                                      box=np.array([20, 30, 280, 430]), multimask_output=True)
    written = np.asarray(Image.open(out))
    assert written.shape == image.shape[:2] and set(np.unique(written)) <= {0, 255}
    np.testing.assert_array_equal(written == 255, masks[np.argmax(iou)])

    overlay = np.asarray(Image.open(out.with_name("mask_overlay.png")))
    assert overlay.shape == image.shape
    assert not np.array_equal(overlay, image)  # the mask tint and prompt marks are drawn


def test_everything_writes_label_image(photo, small_checkpoint, tmp_path):
    out, overlay = tmp_path / "all.png", tmp_path / "all_colours.png"
    argv = [str(photo), "--model", str(small_checkpoint), "--everything", "--points-per-side", "2",
            "--pred-iou-thresh", "0", "--stability-score-thresh", "0", "-o", str(out), "--overlay", str(overlay)]
    assert run(argv) == 0
    labels = np.asarray(Image.open(out))
    assert labels.shape == (451, 300) and labels.max() >= 1
    assert np.asarray(Image.open(overlay)).shape == (451, 300, 3)


@pytest.mark.parametrize(
    "argv, message",
    [
        (["{text}", "--point", "10,10"], "is not a readable image"),
        (["{photo}", "--point", "10,10", "--model", "{bad_model}"], "not a PyTorch checkpoint"),
        (["{photo}", "--point", "10,10", "--model", "{whisper_model}"], "not an official Segment Anything"),
        (["{photo}", "--point", "400,10"], "outside the 300 x 451 image"),
        (["{photo}"], "empty prompt"),
        (["{photo}", "--point", "10"], "--point must be 2 comma-separated numbers"),
        (["{photo}", "--point", "10,10", "--label", "1", "--label", "0"], "one per point"),
        (["{photo}", "--point", "10,10", "--label", "yes"], "--label must be 1"),
        (["{photo}", "--everything", "--box", "1,2,3,4"], "--everything takes no"),
    ],
)
def test_bad_input_is_one_line_and_status_1(argv, message, photo, small_checkpoint, tmp_path, capsys):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    bad_model = tmp_path / "bad.pth"
    bad_model.write_bytes(b"\x00" * 64)
    whisper_model = tmp_path / "whisper.pt"
    torch.save({"encoder.conv1.weight": torch.zeros(4, 80, 3)}, whisper_model)
    paths = dict(text=text, photo=photo, bad_model=bad_model, whisper_model=whisper_model)
    argv = [arg.format(**paths) for arg in argv]
    if "--model" not in argv:
        argv += ["--model", str(small_checkpoint)]
    assert run([*argv, "-o", str(tmp_path / "m.png")]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("turboformer segment: error: ")
    assert message in err
    assert not (tmp_path / "m.png").exists()
