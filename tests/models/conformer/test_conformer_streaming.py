"""Streaming parity with upstream WeNet: ``forward_chunk`` outputs and caches, chunk-by-chunk decoding."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turboformer.models.conformer import ConformerInputError, RecognizeOptions

STREAMS = {"stream_": -1, "stream_left2_": 2}  # fixture prefix -> num_decoding_left_chunks (chunk size 4)


@pytest.mark.parametrize("prefix", list(STREAMS))
@torch.inference_mode()
def test_forward_chunk_outputs_and_caches(model, ref, prefix):
    left = STREAMS[prefix]
    feats = torch.from_numpy(ref.inputs["feats"][:1])  # utterance 0; raw features, CMVN inside
    att_cache = cnn_cache = None
    outputs = []
    for k in range(int(ref[f"{prefix}num_chunks"])):
        start, end = int(ref[f"{prefix}chunk_in_start"][k]), int(ref[f"{prefix}chunk_in_end"][k])
        offset = int(ref[f"{prefix}chunk_offset"][k])
        assert offset == sum(o.size(1) for o in outputs)
        y, att_cache, cnn_cache = model.encoder.forward_chunk(
            feats[:, start:end], offset, 4 * left, att_cache, cnn_cache
        )
        key = f"{prefix}chunk{k:02d}"
        assert y.shape == ref[f"{key}_out"].shape
        assert att_cache.shape == ref[f"{key}_att_cache"].shape  # [layers, heads, history, 2 d_k]
        assert cnn_cache.shape == ref[f"{key}_cnn_cache"].shape  # [layers, 1, D, kernel - 1]
        np.testing.assert_allclose(y.numpy(), ref[f"{key}_out"], atol=ref.ATOL, rtol=0)
        np.testing.assert_allclose(att_cache.numpy(), ref[f"{key}_att_cache"], atol=ref.ATOL, rtol=0)
        np.testing.assert_allclose(cnn_cache.numpy(), ref[f"{key}_cnn_cache"], atol=ref.ATOL, rtol=0)
        outputs.append(y)
    np.testing.assert_allclose(torch.cat(outputs, 1).numpy(), ref[f"{prefix}out"], atol=ref.ATOL, rtol=0)


@pytest.mark.parametrize("prefix", list(STREAMS))
@torch.inference_mode()
def test_forward_chunk_by_chunk(model, ref, prefix):
    out = model.encoder.forward_chunk_by_chunk(ref.features()[0][None], 4, STREAMS[prefix])
    np.testing.assert_allclose(out.numpy(), ref[f"{prefix}out"], atol=ref.ATOL, rtol=0)
    np.testing.assert_allclose(model.ctc(out).numpy(), ref[f"{prefix}ctc_log_probs"], atol=ref.ATOL, rtol=0)


@pytest.mark.parametrize("prefix", list(STREAMS))
def test_simulated_streaming_decodings(recognizer, ref, prefix):
    def run(mode):
        options = RecognizeOptions(
            mode=mode, beam_size=ref.BEAM, ctc_weight=0.3, reverse_weight=0.5, chunk_size=4,
            left_chunks=STREAMS[prefix], simulate_streaming=True,
        )  # fmt: skip
        return recognizer.recognize_features(ref.features()[:1], options)[0]

    assert run("ctc_greedy").tokens == ref.tokens(f"{prefix}ctc_greedy_search", 0)
    beam = run("ctc_prefix_beam")
    assert beam.tokens == ref.tokens(f"{prefix}ctc_prefix_beam_search", 0)
    assert [h.tokens for h in beam.nbest] == ref.nbest(f"{prefix}ctc_prefix_beam_search", 0)
    scores = [h.score for h in beam.nbest]
    nbest_scores = ref[f"{prefix}ctc_prefix_beam_search_nbest_scores"][0]
    np.testing.assert_allclose(scores, nbest_scores, atol=ref.SCORE_ATOL, rtol=0)
    rescored = run("attention_rescoring")
    assert rescored.tokens == ref.tokens(f"{prefix}attention_rescoring", 0)
    assert rescored.score == pytest.approx(ref[f"{prefix}attention_rescoring_scores"][0], abs=ref.SCORE_ATOL)


def test_streaming_errors(model, ref):
    with pytest.raises(ConformerInputError, match="one utterance"):
        model.encoder.forward_chunk(torch.zeros(2, 19, 80), 0, -4)
    with pytest.raises(ConformerInputError, match="chunk_size > 0"):
        model.encoder.forward_chunk_by_chunk(ref.features()[0][None], 0)
    with pytest.raises(ConformerInputError, match="fewer than"):
        model.encoder.forward_chunk_by_chunk(torch.zeros(1, 6, 80), 4)
