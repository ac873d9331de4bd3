"""The CTC prefix-search kernel's own contract: its input checks and the tie order of the units it searches.

Its results are tested against the pure-Python reference (upstream WeNet's algorithm) in
``tests/models/conformer/test_conformer_engine.py`` (every ``batched_search`` test runs it: the interpreter on
CPU, the GPU where one exists), next to the tensor-op version.
"""

import math

import pytest
import torch

from turboformer.kernels import KernelInputError
from turboformer.kernels.ctc_prefix_search import ctc_prefix_search_triton, top_units

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_top_units_orders_ties_by_unit():
    """Equal log-probabilities (the -inf of impossible units, exact ties) come out in unit order, values
    descending: the order every search creates candidates in, the same on CPU and CUDA."""
    row = torch.tensor([-1.0, -math.inf, -0.5, -math.inf, -1.0, -math.inf, -2.0])
    values, units = top_units(row.view(1, 1, -1).to(DEVICE), 7)
    assert units.flatten().tolist() == [2, 0, 4, 6, 1, 3, 5]
    assert values.flatten().tolist() == [-0.5, -1.0, -1.0, -2.0, -math.inf, -math.inf, -math.inf]


def test_bad_inputs_raise():
    log_probs = torch.randn(2, 5, 4, device=DEVICE).log_softmax(-1)
    lengths = torch.tensor([5, 3], device=DEVICE)
    with pytest.raises(KernelInputError, match="beam_size"):
        ctc_prefix_search_triton(log_probs, lengths, 5)
    with pytest.raises(KernelInputError, match="beam_size"):
        ctc_prefix_search_triton(log_probs, lengths, 0)
    with pytest.raises(KernelInputError, match="lengths"):
        ctc_prefix_search_triton(log_probs, lengths[:1], 2)
    with pytest.raises(KernelInputError, match="log_probs"):
        ctc_prefix_search_triton(log_probs[0], lengths, 2)


def test_zero_length_utterance_keeps_the_empty_prefix():
    """An utterance with no valid frames: only the empty prefix, score 0, alive; nothing written."""
    log_probs = torch.randn(2, 4, 6, device=DEVICE).log_softmax(-1)
    tokens, lengths, scores, alive = ctc_prefix_search_triton(log_probs, torch.tensor([4, 0], device=DEVICE), 3)
    assert alive[1].tolist() == [True, False, False]
    assert lengths[1, 0] == 0 and scores[1, 0] == 0.0 and not tokens[1].any()
    assert alive[0].all() and (lengths[0] > 0).any()
