"""Shared fixtures of the SAM tests: one random upstream SAM, saved as an upstream checkpoint and
loaded by each side's own loader (upstream ``load_state_dict(torch.load(...))``, ours ``load_sam``).

Two sizes, both with SAM's real prompt encoder and mask decoder and a tiny ViT (embed 64, depth 4,
2 heads, global attention in blocks 1 and 3, 14-token windows):

* ``tiny``: the real 1024 input frame (64 x 64 tokens), for the prompt parity tests;
* ``small``: a 256 input frame (16 x 16 tokens, windows padded to 28), 16x cheaper per image, for the
  automatic generator, CLI and error tests, which encode many images.

The upstream helpers live in ``sam_reference.py`` beside this file; pytest runs with
``--import-mode=importlib`` (test folders are not on ``sys.path``), so it is loaded here by path and
handed to the tests as the ``reference`` fixture.
"""

import importlib.util

from pathlib import Path

import numpy as np
import pytest
import skimage.data
import torch

from turboformer.models.sam import SamPredictor, load_sam

TINY_ENCODER = dict(embed_dim=64, depth=4, num_heads=2, global_attn_indexes=(1, 3))


def _load_reference():
    spec = importlib.util.spec_from_file_location("sam_reference", Path(__file__).with_name("sam_reference.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


sam_reference = _load_reference()


@pytest.fixture(scope="session")
def reference():
    """The ``sam_reference`` helper module (upstream import, test-only torchvision stand-ins, builders)."""
    return sam_reference


@pytest.fixture(scope="session")
def upstream():
    """Upstream segment_anything modules (see ``sam_reference.import_upstream``)."""
    return sam_reference.import_upstream()


@pytest.fixture(scope="session")
def images() -> dict[str, np.ndarray]:
    """Real photos from scikit-image: square, landscape, and portrait (chelsea transposed)."""
    return {
        "astronaut": skimage.data.astronaut(),  # 512 x 512
        "coffee": skimage.data.coffee(),  # 400 x 600
        "chelsea_portrait": np.ascontiguousarray(skimage.data.chelsea().transpose(1, 0, 2)),  # 451 x 300
    }


def _checkpoint(upstream, tmp_path_factory, image_size: int, seed: int) -> Path:
    torch.manual_seed(seed)
    model = sam_reference.build_upstream_sam(upstream, image_size=image_size, **TINY_ENCODER)
    sam_reference.randomize_(model, seed=seed + 1)
    path = tmp_path_factory.mktemp("sam") / f"sam_tiny_{image_size}.pth"
    torch.save(model.state_dict(), path)
    return path


def _upstream_model(upstream, path: Path, image_size: int) -> torch.nn.Module:
    model = sam_reference.build_upstream_sam(upstream, image_size=image_size, **TINY_ENCODER)
    model.load_state_dict(torch.load(path, weights_only=True))
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(upstream, tmp_path_factory) -> Path:
    return _checkpoint(upstream, tmp_path_factory, 1024, seed=0)


@pytest.fixture(scope="session")
def small_checkpoint(upstream, tmp_path_factory) -> Path:
    return _checkpoint(upstream, tmp_path_factory, 256, seed=10)


@pytest.fixture(scope="session")
def tiny_upstream_model(upstream, tiny_checkpoint):
    return _upstream_model(upstream, tiny_checkpoint, 1024)


@pytest.fixture(scope="session")
def small_upstream_model(upstream, small_checkpoint):
    return _upstream_model(upstream, small_checkpoint, 256)


@pytest.fixture(scope="session")
def tiny_model(tiny_checkpoint):
    return load_sam(tiny_checkpoint)


@pytest.fixture(scope="session")
def small_model(small_checkpoint):
    return load_sam(small_checkpoint)


@pytest.fixture(scope="session")
def predictor_pair(upstream, tiny_upstream_model, tiny_model, images):
    """``get(name) -> (ours, upstream)`` predictors with image ``name`` set (each encoded once)."""
    cache = {}

    def get(name: str):
        if name not in cache:
            ours = SamPredictor(tiny_model)
            ours.set_image(images[name])
            theirs = upstream.predictor.SamPredictor(tiny_upstream_model)
            theirs.set_image(images[name])
            cache[name] = (ours, theirs)
        return cache[name]

    return get
