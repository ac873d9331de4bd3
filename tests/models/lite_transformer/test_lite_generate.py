"""Beam search against fairseq's SequenceGenerator outputs stored in the fixture (expected.npz): identical tokens,
scores and positional scores within 1e-4, for the padded batch (lenpen 0.6 and 1.0) and each row alone."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from turboformer.models.lite_transformer.generate import (
    BeamSearch,
    BeamSearchOptions,
    GenerationError,
    Hypothesis,
    SpecialTokens,
)
from turboformer.models.lite_transformer.translate import TranslateOptions

ATOL = 1e-4
FIXTURE_SETTINGS = dict(beam=4, max_len_b=10, nbest=4)  # README: --beam 4 --max-len-b 10, all 4 beams returned


def assert_hypotheses(got: list[list[Hypothesis]], expected: dict, prefix: str) -> None:
    tokens, scores, positional = (
        expected[f"{prefix}_tokens"],
        expected[f"{prefix}_scores"],
        expected[f"{prefix}_positional_scores"],
    )
    assert len(got) == tokens.shape[0]
    for row, hypotheses in enumerate(got):
        assert len(hypotheses) == tokens.shape[1]
        for rank, hyp in enumerate(hypotheses):
            want = tokens[row, rank]
            assert hyp.tokens == tuple(want[want >= 0].tolist()), (prefix, row, rank)
            assert abs(hyp.score - scores[row, rank]) <= ATOL, (prefix, row, rank)
            want_pos = positional[row, rank][~np.isnan(positional[row, rank])]
            np.testing.assert_allclose(hyp.positional_scores, want_pos, atol=ATOL, rtol=0)


@pytest.mark.parametrize("lenpen,key", [(0.6, "06"), (1.0, "10")])
def test_padded_batch(translator, expected, lenpen, key):
    got = translator.generate(
        torch.from_numpy(expected["src_tokens"]), TranslateOptions(lenpen=lenpen, **FIXTURE_SETTINGS)
    )
    assert_hypotheses(got, expected, f"beam_lenpen{key}")


@pytest.mark.parametrize("row", range(4))
def test_single_rows(translator, expected, row):
    got = translator.generate(
        torch.from_numpy(expected[f"single{row}_src_tokens"]), TranslateOptions(lenpen=0.6, **FIXTURE_SETTINGS)
    )
    assert_hypotheses(got, expected, f"beam_lenpen06_single{row}")


def test_nbest_is_a_prefix(translator, expected):
    src = torch.from_numpy(expected["src_tokens"])
    best = translator.generate(src, TranslateOptions(lenpen=0.6, beam=4, max_len_b=10, nbest=1))
    assert [h[0].tokens for h in best] == [tuple(t[t >= 0].tolist()) for t in expected["beam_lenpen06_tokens"][:, 0]]


class ConstantDecoder:
    """Every hypothesis sees the same next-token distribution (ids: <s> 0, <pad> 1, </s> 2, <unk> 3, a 4, b 5)."""

    PROBS = (0.02, 0.03, 0.5, 0.06, 0.25, 0.14)

    def log_probs(self, tokens: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.PROBS).log().expand(tokens.size(0), -1).clone()

    def reorder(self, order: torch.Tensor) -> None:
        """Stateless: nothing to reorder."""


SPECIAL = SpecialTokens(eos=2, pad=1, unk=3, start=2)


def test_min_len_forbids_eos_at_the_start():
    """</s> (p = 0.5) may not come first; the best two continuations a (0.25), b (0.14) end at step 1."""
    got = BeamSearch(BeamSearchOptions(beam_size=2, lenpen=1.0, nbest=2), SPECIAL)(ConstantDecoder(), 1, max_len=5)
    assert [h.tokens for h in got[0]] == [(4, 2), (5, 2)]
    np.testing.assert_allclose(got[0][0].positional_scores, [math.log(0.25), math.log(0.5)], rtol=1e-6)
    assert got[0][0].score == pytest.approx(math.log(0.25 * 0.5) / 2, rel=1e-6)


def test_max_len_forces_eos_and_lenpen_normalises():
    got = BeamSearch(BeamSearchOptions(beam_size=1, lenpen=0.5, min_len=3), SPECIAL)(ConstantDecoder(), 2, max_len=2)
    for sentence in got:  # eos forbidden at steps 0-1 (min_len 3) but forced at step 2 = max_len
        assert sentence[0].tokens == (4, 4, 2)
        assert sentence[0].score == pytest.approx(math.log(0.25 * 0.25 * 0.5) / 3**0.5, rel=1e-6)


def test_unk_penalty_and_unnormalised_scores():
    """A large <unk> reward (log 0.06 + 5 > log 0.5) keeps <unk> the best candidate at every step, so the </s>
    candidates never reach the top beam until max_len forces </s>; without normalisation the score is the raw sum."""
    options = BeamSearchOptions(beam_size=1, unk_penalty=-5.0, normalize_scores=False)
    got = BeamSearch(options, SPECIAL)(ConstantDecoder(), 1, max_len=3)
    assert got[0][0].tokens == (3, 3, 3, 2)
    assert got[0][0].score == pytest.approx(3 * (math.log(0.06) + 5.0) + math.log(0.5), rel=1e-6)


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(beam_size=0), "beam_size"), (dict(beam_size=2, nbest=3), "nbest"), (dict(min_len=-1), "min_len")],
)
def test_bad_options(kwargs, message):
    with pytest.raises(GenerationError, match=message):
        BeamSearchOptions(**kwargs)


def test_beam_larger_than_vocabulary():
    with pytest.raises(GenerationError, match="smaller than the vocabulary"):
        BeamSearch(BeamSearchOptions(beam_size=6, nbest=1), SPECIAL)(ConstantDecoder(), 1, max_len=3)
