"""Bad checkpoints and bad prompts raise clear ValueError subclasses, never a silent wrong result."""

import numpy as np
import pytest
import torch

from turboformer.models.sam import SamCheckpointError, SamInputError, SamPredictor, load_sam


@pytest.fixture(scope="module")
def predictor(small_model, images):
    """Our predictor on the small model with coffee (400 x 600) set."""
    predictor = SamPredictor(small_model)
    predictor.set_image(images["coffee"])
    return predictor


@pytest.fixture(scope="module")
def state_dict(small_checkpoint):
    return torch.load(small_checkpoint, weights_only=True)


def test_missing_and_unreadable_files(tmp_path):
    with pytest.raises(SamCheckpointError, match="not found"):
        load_sam(tmp_path / "nope.pth")
    text = tmp_path / "notes.pth"
    text.write_text("not a checkpoint\n")
    with pytest.raises(SamCheckpointError, match="not a PyTorch checkpoint"):
        load_sam(text)
    listed = tmp_path / "list.pth"
    torch.save([torch.zeros(2)], listed)
    with pytest.raises(SamCheckpointError, match="state dict"):
        load_sam(listed)


def test_checkpoint_of_another_model(tmp_path):
    whisper_like = {"encoder.conv1.weight": torch.zeros(4, 80, 3), "decoder.token_embedding.weight": torch.zeros(9, 4)}
    with pytest.raises(SamCheckpointError, match="not an official Segment Anything checkpoint"):
        load_sam(whisper_like)


def test_incomplete_extra_and_misshapen_tensors(state_dict):
    incomplete = {k: v for k, v in state_dict.items() if k != "prompt_encoder.point_embeddings.2.weight"}
    with pytest.raises(SamCheckpointError, match="point_embeddings.2.weight"):
        load_sam(incomplete)
    with pytest.raises(SamCheckpointError, match="unexpected tensors.*extra.weight"):
        load_sam({**state_dict, "extra.weight": torch.zeros(1)})
    misshapen = {**state_dict, "mask_decoder.iou_token.weight": torch.zeros(2, 256)}
    with pytest.raises(SamCheckpointError, match="output_tokens.*shape"):
        load_sam(misshapen)
    mixed_windows = {**state_dict, "image_encoder.blocks.0.attn.rel_pos_h": torch.zeros(13, 32)}
    with pytest.raises(SamCheckpointError, match="window sizes"):
        load_sam(mixed_windows)


@pytest.mark.parametrize(
    "image, message",
    [
        (np.zeros((20, 30), dtype=np.uint8), "shape"),
        (np.zeros((20, 30, 4), dtype=np.uint8), "shape"),
        (np.zeros((20, 30, 3), dtype=np.float32), "uint8"),
        (np.zeros((0, 30, 3), dtype=np.uint8), "empty"),
        ([[1, 2, 3]], "numpy array"),
    ],
)
def test_bad_images(small_model, image, message):
    with pytest.raises(SamInputError, match=message):
        SamPredictor(small_model).set_image(image)


@pytest.mark.parametrize(
    "prompt, message",
    [
        (dict(), "empty prompt"),
        (dict(point_coords=[[10, 10]]), "together"),
        (dict(point_coords=[[700, 10]], point_labels=[1]), "outside the 600 x 400 image"),
        (dict(point_coords=[[10, -1]], point_labels=[1]), "outside"),
        (dict(point_coords=[[10, np.nan]], point_labels=[1]), "outside"),
        (dict(point_coords=[[10, 10, 3]], point_labels=[1]), r"shape \[N, 2\]"),
        (dict(point_coords=[[10, 10], [20, 20]], point_labels=[1]), r"shape \[2\]"),
        (dict(point_coords=[[10, 10]], point_labels=[2]), "foreground"),
        (dict(box=[50, 60, 40, 80]), "x0 <= x1"),
        (dict(box=[0, 0, 601, 80]), "x0 <= x1"),
        (dict(box=[1, 2, 3]), "4 numbers"),
        (dict(mask_input=np.zeros((1, 32, 32))), r"mask_input must have shape \[1, 64, 64\]"),
        (dict(point_coords=[[10, 10]], point_labels=[1], image_index=1), "out of range"),
    ],
)
def test_bad_prompts(predictor, prompt, message):
    prompt = {k: np.asarray(v) if isinstance(v, list) else v for k, v in prompt.items()}
    with pytest.raises(SamInputError, match=message):
        predictor.predict(**prompt)


def test_bad_prompt_batches(predictor):
    coords, labels = torch.zeros(2, 1, 2), torch.ones(2, 1, dtype=torch.int32)
    with pytest.raises(SamInputError, match="batch sizes differ"):
        predictor.predict_torch(coords, labels, boxes=torch.zeros(3, 4))
    with pytest.raises(SamInputError, match=r"point_labels must have shape \[2, 1\]"):
        predictor.predict_torch(coords, labels[:, 0])
    with pytest.raises(SamInputError, match=r"\[B, N, 2\]"):
        predictor.predict_torch(coords[0], labels)
    with pytest.raises(SamInputError, match="foreground"):
        predictor.predict_torch(coords, labels + 4)
    with pytest.raises(SamInputError, match="empty prompt"):
        predictor.predict_torch(None, None)


def test_predict_before_set_image(small_model):
    with pytest.raises(SamInputError, match="no image is set"):
        SamPredictor(small_model).predict(point_coords=np.array([[1, 1]]), point_labels=np.array([1]))
    with pytest.raises(SamInputError, match="at least one image"):
        SamPredictor(small_model).set_images([])
