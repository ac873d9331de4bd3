"""``turboformer segment``: a mask PNG and an overlay PNG for a photo, from prompts or for everything.

    turboformer segment photo.jpg --model sam_vit_b.pth --point 500,375 --label 1 -o mask.png
    turboformer segment photo.jpg --model sam_vit_b.pth --box 100,80,620,500 --point 300,200 --label 0
    turboformer segment photo.jpg --model sam_vit_b.pth --everything -o masks.png
    turboformer segment photo.jpg --model sam_vit_h.pth --point 500,375 --dtype bfloat16 --quantize int8

On CUDA the model runs in bfloat16 by default (``--dtype float32`` for the parity path), the prompt
decoder as CUDA graphs; ``--quantize int8`` makes the image encoder's linear layers weight-only INT8.
Both are GPU options: on the CPU the model runs in float32 and asking for either is an error.

With prompts, ``-o`` gets the mask (white on black; with ``--multimask`` the one of the three with the
highest predicted IoU). With ``--everything``, ``-o`` gets a label image: pixel value k > 0 is mask k
(larger masks first, smaller ones painted over them; 16-bit when there are more than 255). The overlay
(``--overlay``, default ``<output>_overlay.png``) shows the masks in colour over the photo, with the
prompts drawn. Bad input (not an image, a point outside it, no prompt, a wrong checkpoint) prints one
line on stderr and exits with status 1.
"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageOps, UnidentifiedImageError

from .automatic import AutomaticMaskOptions, GeneratedMask, SamAutomaticMaskGenerator
from .config import config_name
from .errors import SamCheckpointError, SamInputError, first_line
from .load import load_sam
from .predictor import SamPredictor

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MASK_COLOR = (30, 144, 255)  # overlay colour of a prompted mask (upstream notebooks' blue)
POSITIVE_COLOR, NEGATIVE_COLOR, BOX_COLOR = (0, 200, 0), (220, 0, 0), (0, 200, 0)
OVERLAY_ALPHA = 0.5  # weight of the mask colour in the overlay


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``segment`` subcommand to ``subparsers``; it runs :func:`main`."""
    parser = subparsers.add_parser(
        "segment",
        help="segment an image with Segment Anything (points, a box, or everything)",
        description="Predict a mask for the prompted object (or masks for everything) and write PNGs.",
    )
    parser.add_argument("image", help="the photo (any format PIL reads)")
    parser.add_argument("--model", required=True, help="official SAM checkpoint, e.g. sam_vit_b_01ec64.pth")
    parser.add_argument("--point", action="append", default=[], metavar="X,Y",
                        help="a prompt point in image pixels (repeatable)")
    parser.add_argument("--label", action="append", default=[], metavar="{1,0}",
                        help="label of the matching --point: 1 object, 0 background (default 1)")
    parser.add_argument("--box", metavar="X0,Y0,X1,Y1", help="a box prompt in image pixels")
    parser.add_argument("--multimask", action="store_true",
                        help="predict three masks and keep the one with the highest predicted IoU")
    parser.add_argument("--everything", action="store_true", help="segment everything (no prompts)")
    parser.add_argument("--points-per-side", type=int, default=32, help="--everything: grid points per side")
    parser.add_argument("--pred-iou-thresh", type=float, default=0.88, help="--everything: min predicted IoU")
    parser.add_argument("--stability-score-thresh", type=float, default=0.95,
                        help="--everything: min stability score")
    parser.add_argument("-o", "--output", default="mask.png", help="mask PNG to write (default mask.png)")
    parser.add_argument("--overlay", help="overlay PNG to write (default <output>_overlay.png)")
    parser.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=sorted(DTYPES),
                        help="model precision on CUDA (default bfloat16 on CUDA, float32 on the CPU)")
    parser.add_argument("--quantize", choices=["int8"],
                        help="weight-only INT8 for the image encoder's linear layers (CUDA only)")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run ``segment``; return the exit status (0 ok, 1 bad input, with one line on stderr)."""
    try:
        _run(args)
    except (SamInputError, SamCheckpointError, OSError) as err:
        print(f"turboformer segment: error: {first_line(err)}", file=sys.stderr)
        return 1
    return 0


def _numbers(text: str, count: int, what: str) -> list[float]:
    """Parse ``count`` comma-separated numbers, e.g. "500,375"."""
    try:
        values = [float(v) for v in text.split(",")]
    except ValueError:
        values = []
    if len(values) != count:
        raise SamInputError(f"{what} must be {count} comma-separated numbers, got {text!r}")
    return values


def _read_image(path: str) -> np.ndarray:
    """``[H, W, 3]`` uint8 RGB, upright per EXIF orientation."""
    try:
        with Image.open(path) as image:
            return np.asarray(ImageOps.exif_transpose(image).convert("RGB"))
    except FileNotFoundError:
        raise SamInputError(f"image not found: {path}") from None
    except (UnidentifiedImageError, OSError) as err:
        raise SamInputError(f"{path} is not a readable image ({first_line(err)})") from None


def _run(args: argparse.Namespace) -> None:
    points = np.array([_numbers(p, 2, "--point") for p in args.point]).reshape(-1, 2)
    if args.label and len(args.label) != len(points):
        raise SamInputError(f"got {len(args.label)} --label for {len(points)} --point; give one per point")
    if any(label not in ("0", "1") for label in args.label):
        raise SamInputError(f"--label must be 1 (object) or 0 (background), got {args.label}")
    labels = np.array([int(v) for v in args.label] if args.label else [1] * len(points))
    box = np.array(_numbers(args.box, 4, "--box")) if args.box else None
    if args.everything and (len(points) or box is not None):
        raise SamInputError("--everything takes no --point or --box")
    if not args.everything and not len(points) and box is None:
        raise SamInputError("empty prompt: give --point X,Y (with --label), --box X0,Y0,X1,Y1, or --everything")

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    if not on_cuda and args.dtype not in (None, "float32"):
        raise SamInputError(f"--dtype {args.dtype} is a GPU option: use --device cuda, or float32 on {device}")
    if not on_cuda and args.quantize:
        raise SamInputError(f"--quantize {args.quantize} is a GPU option: use --device cuda (got {device})")
    if on_cuda and not torch.cuda.is_available():
        raise SamInputError("--device cuda was asked for but no CUDA GPU is available")
    dtype = DTYPES[args.dtype or ("bfloat16" if on_cuda else "float32")]

    image = _read_image(args.image)
    model = load_sam(args.model, device=device, dtype=dtype, quantize=args.quantize)
    output = Path(args.output)
    overlay_path = Path(args.overlay) if args.overlay else output.with_name(f"{output.stem}_overlay.png")
    output.parent.mkdir(parents=True, exist_ok=True)
    overlay_path.parent.mkdir(parents=True, exist_ok=True)
    precision = str(dtype).removeprefix("torch.") + (f" + {args.quantize} encoder" if args.quantize else "")
    print(f"model: SAM {config_name(model.config) or 'custom'} on {device} ({precision}); image {image.shape[1]}x{image.shape[0]}")

    if args.everything:
        options = AutomaticMaskOptions(
            points_per_side=args.points_per_side,
            pred_iou_thresh=args.pred_iou_thresh,
            stability_score_thresh=args.stability_score_thresh,
        )
        masks = SamAutomaticMaskGenerator(model, options).generate(image)
        label_image, overlay = _everything_images(image, masks)
        Image.fromarray(label_image).save(output)
        print(f"{len(masks)} masks -> {output}")
    else:
        predictor = SamPredictor(model, decoder_buckets=(1,))  # one prompt: capture only bucket 1
        predictor.set_image(image)
        result = predictor.predict(
            point_coords=points if len(points) else None,
            point_labels=labels if len(points) else None,
            box=box,
            multimask_output=args.multimask,
        )
        for k, (mask, iou) in enumerate(zip(result.masks, result.iou_predictions)):
            print(f"mask {k}: predicted IoU {iou:.3f}, area {int(mask.sum())} px")
        best = int(np.argmax(result.iou_predictions))
        mask = result.masks[best]
        Image.fromarray(mask.astype(np.uint8) * 255).save(output)
        overlay = _prompt_overlay(image, mask, points, labels, box)
        print(f"mask {best} -> {output}")
    Image.fromarray(overlay).save(overlay_path)
    print(f"overlay -> {overlay_path}")


def _blend(image: np.ndarray, mask: np.ndarray, color: tuple[int, int, int]) -> None:
    """Tint ``image`` (in place) with ``color`` where ``mask`` is set."""
    image[mask] = ((1 - OVERLAY_ALPHA) * image[mask] + OVERLAY_ALPHA * np.array(color)).astype(np.uint8)


def _prompt_overlay(
    image: np.ndarray, mask: np.ndarray, points: np.ndarray, labels: np.ndarray, box: np.ndarray | None
) -> np.ndarray:
    """The photo with the mask tinted and the prompt points (green object, red background) and box."""
    overlay = image.copy()
    _blend(overlay, mask, MASK_COLOR)
    canvas = Image.fromarray(overlay)
    draw = ImageDraw.Draw(canvas)
    radius = max(3, round(max(image.shape[:2]) / 150))
    for (x, y), label in zip(points, labels):
        color = POSITIVE_COLOR if label == 1 else NEGATIVE_COLOR
        draw.ellipse([x - radius, y - radius, x + radius, y + radius], fill=color, outline=(255, 255, 255))
    if box is not None:
        draw.rectangle(box.tolist(), outline=BOX_COLOR, width=max(2, radius // 2))
    return np.asarray(canvas)


def _everything_images(image: np.ndarray, masks: list[GeneratedMask]) -> tuple[np.ndarray, np.ndarray]:
    """Label image (0 background, k for the k-th largest mask) and a random-colour overlay."""
    dtype = np.uint8 if len(masks) < 256 else np.uint16
    labels = np.zeros(image.shape[:2], dtype=dtype)
    overlay = image.copy()
    colors = np.random.default_rng(0).integers(0, 256, size=(len(masks), 3))
    for k, found in enumerate(sorted(masks, key=lambda m: m.area, reverse=True), start=1):
        labels[found.segmentation] = k
        _blend(overlay, found.segmentation, tuple(colors[k - 1]))
    return labels, overlay
