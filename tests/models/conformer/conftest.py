"""Session fixtures for the WeNet Conformer tests.

The independent reference is ``/work/shared/reference/wenet`` (see its README.md): a tiny U2++ model in
the upstream format and every intermediate tensor and decoding result that upstream WeNet produced for it.
Helpers are methods of the ``ref`` fixture (test modules here cannot import each other under
``--import-mode=importlib``).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

# $TURBOFORMER_REFERENCE_DIR/wenet (the GPU machine), else ../shared/reference/wenet beside the checkout
_ROOT = os.environ.get("TURBOFORMER_REFERENCE_DIR")
REFERENCE = (Path(_ROOT) if _ROOT else Path(__file__).resolve().parents[4] / "shared" / "reference") / "wenet"


class WenetReference:
    """The fixture folder's arrays plus the comparisons every test needs."""

    ATOL = 1e-4  # fp32 tensors (upstream float32 vs float64 differ by <= 1e-5; README "Tolerances observed")
    SCORE_ATOL = 1e-3  # summed scores (sums of ~40 log-probabilities)
    BEAM = 4  # the fixture's beam size
    SOS = EOS = 2

    def __init__(self, folder: Path):
        self.dir = folder
        with np.load(folder / "expected.npz") as data:
            self.expected = dict(data)
        with np.load(folder / "inputs.npz") as data:
            self.inputs = dict(data)

    def __getitem__(self, key: str) -> np.ndarray:
        return self.expected[key]

    def features(self) -> list[torch.Tensor]:
        """The three utterances, unpadded raw fbank [T_b, 80]."""
        return [torch.from_numpy(self.inputs["feats"][b, :n]) for b, n in enumerate(self.inputs["feats_lengths"])]

    def tokens(self, key: str, b: int) -> tuple[int, ...]:
        """Token ids of utterance ``b`` from ``<key>_tokens`` / ``<key>_lens``."""
        return tuple(int(t) for t in self.expected[f"{key}_tokens"][b, : self.expected[f"{key}_lens"][b]])

    def nbest(self, key: str, b: int) -> list[tuple[int, ...]]:
        """N-best token lists of utterance ``b`` from ``<key>_nbest_tokens`` / ``<key>_nbest_lens``."""
        lens = self.expected[f"{key}_nbest_lens"][b]
        return [tuple(int(t) for t in self.expected[f"{key}_nbest_tokens"][b, j, : lens[j]]) for j in range(len(lens))]

    def assert_close_valid(self, actual: torch.Tensor, key: str, lengths, atol: float = ATOL) -> None:
        """Compare [B, T, ...] with ``expected[key]`` on valid frames ``t < lengths[b]`` (padding means nothing)."""
        reference = self.expected[key]
        for b, n in enumerate(lengths):
            np.testing.assert_allclose(
                actual[b, :n].float().numpy(), reference[b, :n], atol=atol, rtol=0, err_msg=f"{key}, b={b}"
            )


@pytest.fixture(scope="session")
def ref() -> WenetReference:
    if not (REFERENCE / "expected.npz").is_file():
        pytest.fail(f"WeNet reference fixtures missing: expected them in {REFERENCE}")
    return WenetReference(REFERENCE)


@pytest.fixture(scope="session")
def recognizer(ref):
    from turboformer.models.conformer import ConformerRecognizer

    return ConformerRecognizer.from_dir(ref.dir)


@pytest.fixture(scope="session")
def model(recognizer):
    return recognizer.model


@pytest.fixture(autouse=True)
def single_thread():
    """This folder's tensors are tiny: one intra-op thread avoids oversubscription stalls on a busy 2-core CI
    machine (15x slower decoder steps measured with 2 threads under load). Restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
