"""Shared fixtures: the upstream reference fixture (``shared/reference/lite_transformer``, generated with
mit-han-lab/lite-transformer; see its README) and models loaded from it once per session.

``upstream_ref`` is ``lite_upstream_ref.py`` (a functional transcription of the upstream forward pass), loaded by
path because the suite runs with ``--import-mode=importlib`` (test folders are not on ``sys.path``).

The fixture folder is looked up in ``$TURBOFORMER_REFERENCE_DIR``, then ``<repo>/shared/reference`` and
``<repo>/../shared/reference``; without it the tests fail with that message (they never skip silently).
"""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch

from turboformer.models.lite_transformer.load import load_model_dir
from turboformer.models.lite_transformer.translate import LiteTransformerTranslator

REPO = Path(__file__).resolve().parents[3]
_CANDIDATES = [
    *([Path(os.environ["TURBOFORMER_REFERENCE_DIR"]).resolve()] if "TURBOFORMER_REFERENCE_DIR" in os.environ else []),
    REPO / "shared" / "reference",
    REPO.parent / "shared" / "reference",
]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The fixture models are tiny: one intra-op thread is fastest, and on a busy 2-core machine several OpenMP
    threads spinning on microsecond ops slow these tests down by 10-50x. Restored after each module."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def reference_dir() -> Path:
    for root in _CANDIDATES:
        if (root / "lite_transformer" / "checkpoint.pt").is_file():
            return root / "lite_transformer"
    pytest.fail(f"Lite Transformer reference fixture not found in any of {[str(c) for c in _CANDIDATES]}")


@pytest.fixture(scope="session")
def expected(reference_dir: Path) -> dict[str, np.ndarray]:
    with np.load(reference_dir / "expected.npz") as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def expected_generate(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "expected_generate.json").read_text())


@pytest.fixture(scope="session")
def loaded(reference_dir: Path):
    return load_model_dir(reference_dir)


@pytest.fixture(scope="session")
def translator(reference_dir: Path) -> LiteTransformerTranslator:
    return LiteTransformerTranslator.from_dir(reference_dir)


@pytest.fixture(scope="session")
def upstream_ref() -> ModuleType:
    spec = importlib.util.spec_from_file_location("lite_upstream_ref", Path(__file__).with_name("lite_upstream_ref.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
