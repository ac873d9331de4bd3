"""Decoding parity with upstream WeNet ``ASRModel.decode``: CTC greedy / prefix beam, attention beam search,
attention rescoring (three weight settings), decoder logits and rescoring internals; batched == one-by-one."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from turboformer.models.conformer import RecognizeOptions
from turboformer.models.conformer.search import attention_beam_search, decoder_log_probs

# fixture prefix -> (chunk_size, left_chunks, batch); "single" decodes one utterance at a time.
SETTINGS = {"full": (-1, -1, 3), "single": (-1, -1, 1), "chunk4": (4, -1, 3), "chunk4_left2": (4, 2, 3)}
UPSTREAM_MODE = {
    "ctc_greedy": "ctc_greedy_search",
    "ctc_prefix_beam": "ctc_prefix_beam_search",
    "attention": "attention",
    "attention_rescoring": "attention_rescoring",
}


def _decode(recognizer, features, mode, chunk=-1, left=-1, batch=3, ctc_weight=0.3, reverse_weight=0.5):
    options = RecognizeOptions(
        mode=mode, beam_size=4, ctc_weight=ctc_weight, reverse_weight=reverse_weight,
        chunk_size=chunk, left_chunks=left, batch=batch,
    )  # fmt: skip
    return recognizer.recognize_features(features, options)


@pytest.mark.parametrize("setting", list(SETTINGS))
@pytest.mark.parametrize("mode", ["ctc_greedy", "ctc_prefix_beam", "attention_rescoring"])
def test_decoding_modes(recognizer, ref, setting, mode):
    chunk, left, batch = SETTINGS[setting]
    results = _decode(recognizer, ref.features(), mode, chunk, left, batch)
    key = f"{setting}_{UPSTREAM_MODE[mode]}"
    for b, result in enumerate(results):
        assert result.tokens == ref.tokens(key, b), f"utterance {b}"
        assert result.text == recognizer.symbols.detokenize(result.tokens)
        if mode == "ctc_prefix_beam":
            assert [h.tokens for h in result.nbest] == ref.nbest(key, b)
            np.testing.assert_allclose(
                [h.score for h in result.nbest], ref[f"{key}_nbest_scores"][b], atol=ref.SCORE_ATOL, rtol=0
            )
        if mode == "attention_rescoring":
            assert result.score == pytest.approx(ref[f"{key}_scores"][b], abs=ref.SCORE_ATOL)


def test_attention_search_one_by_one(recognizer, ref):
    """The recognizer's attention search gives WeNet's result for each utterance decoded alone."""
    for batch in (1, 3):
        for b, result in enumerate(_decode(recognizer, ref.features(), "attention", batch=batch)):
            assert result.tokens == ref.tokens("single_attention", b), f"utterance {b}, batch {batch}"
            assert result.text == recognizer.symbols.detokenize(result.tokens)


@pytest.mark.parametrize("setting", ["full", "chunk4", "chunk4_left2"])
@torch.inference_mode()
def test_attention_search_upstream_batched(model, ref, setting):
    """With ``max_steps`` = padded length, the search reproduces WeNet's batched decode, where an utterance
    without ``<eos>`` keeps going up to the longest utterance's length (chunk4_left2 utterance 2: 49 tokens
    from 21 frames)."""
    chunk, left, _ = SETTINGS[setting]
    features = ref.features()
    feats = torch.nn.utils.rnn.pad_sequence(features, batch_first=True)
    encoder_out, lengths = model.encode(feats, torch.tensor([f.size(0) for f in features]), chunk, left)
    nbests = attention_beam_search(
        model.decoder.left_decoder, encoder_out, lengths, ref.BEAM, ref.SOS, ref.EOS, max_steps=encoder_out.size(1)
    )
    for b, nbest in enumerate(nbests):
        assert nbest[0][0] == ref.tokens(f"{setting}_attention", b), f"utterance {b}"


@pytest.mark.parametrize("suffix, ctc_weight, reverse_weight", [("_rw03", 0.3, 0.3), ("_rw0_cw0", 0.0, 0.0)])
def test_rescoring_weights(recognizer, ref, suffix, ctc_weight, reverse_weight):
    results = _decode(
        recognizer, ref.features(), "attention_rescoring", ctc_weight=ctc_weight, reverse_weight=reverse_weight
    )
    key = f"full_attention_rescoring{suffix}"
    for b, result in enumerate(results):
        assert result.tokens == ref.tokens(key, b)
        assert result.score == pytest.approx(ref[f"{key}_scores"][b], abs=ref.SCORE_ATOL)


def test_attention_beam_score_is_teacher_forced_log_prob(recognizer, ref):
    results = _decode(recognizer, ref.features(), "attention")
    scores = [r.score for r in results]
    np.testing.assert_allclose(scores, ref["full_attention_tf_logprob"], atol=ref.SCORE_ATOL, rtol=0)
    for r in results:  # n-best best first
        assert [h.score for h in r.nbest] == sorted((h.score for h in r.nbest), reverse=True)


def test_ctc_greedy_score_is_best_path(recognizer, ref):
    results = _decode(recognizer, ref.features(), "ctc_greedy")
    for b, r in enumerate(results):
        n = ref["encoder_out_lens"][b]
        best_path = float(ref["ctc_log_probs"][b, :n].max(-1).astype(np.float64).sum())
        assert r.score == pytest.approx(best_path, abs=ref.SCORE_ATOL)


@torch.inference_mode()
def test_teacher_forced_logits(model, ref):
    encoder_out = torch.from_numpy(ref["encoder_out"])
    lengths = torch.from_numpy(ref["encoder_out_lens"])
    memory_mask = (torch.arange(encoder_out.size(1)) < lengths[:, None]).unsqueeze(1)
    ys_lens = torch.from_numpy(ref["tf_ys_in_lens"])
    left = model.decoder.left_decoder(encoder_out, memory_mask, torch.from_numpy(ref["tf_ys_in"]), ys_lens)
    right = model.decoder.right_decoder(encoder_out, memory_mask, torch.from_numpy(ref["tf_r_ys_in"]), ys_lens)
    for b, n in enumerate(ys_lens.tolist()):
        np.testing.assert_allclose(left[b, :n].numpy(), ref["tf_l2r_logits"][b, :n], atol=ref.ATOL, rtol=0)
        np.testing.assert_allclose(right[b, :n].numpy(), ref["tf_r2l_logits"][b, :n], atol=ref.ATOL, rtol=0)


@torch.inference_mode()
def test_incremental_steps_on_static_cache(model, ref):
    """Token-by-token decoding on the preallocated cache gives upstream's teacher-forced distributions, and the
    cache tensors are written in place (same storage at every step)."""
    decoder = model.decoder.left_decoder
    encoder_out = torch.from_numpy(ref["encoder_out"])
    lengths = torch.from_numpy(ref["encoder_out_lens"])
    memory_mask = (torch.arange(encoder_out.size(1)) < lengths[:, None]).unsqueeze(1)
    ys_in = torch.from_numpy(ref["tf_ys_in"])
    cache = decoder.init_cache(encoder_out, memory_mask, ys_in.size(1))
    storage = [t.data_ptr() for t in cache.self_k + cache.self_v]
    expected = torch.log_softmax(torch.from_numpy(ref["tf_l2r_logits"]), dim=-1)
    for position in range(ys_in.size(1)):
        log_probs = decoder.step(ys_in[:, position], position, cache)  # [B, V]
        for b, n in enumerate(ref["tf_ys_in_lens"]):
            if position < n:
                np.testing.assert_allclose(log_probs[b].numpy(), expected[b, position].numpy(), atol=ref.ATOL, rtol=0)
    assert [t.data_ptr() for t in cache.self_k + cache.self_v] == storage


@pytest.mark.parametrize("b", [0, 1, 2])
@torch.inference_mode()
def test_rescoring_decoder_internals(model, ref, b):
    n = int(ref["encoder_out_lens"][b])
    encoder_out = torch.from_numpy(ref["encoder_out"][b : b + 1, :n])
    hyps = ref.nbest("full_ctc_prefix_beam_search", b)
    in_lens = ref[f"rescore_utt{b}_hyps_in_lens"]
    assert [len(h) + 1 for h in hyps] == in_lens.tolist()
    for j, h in enumerate(hyps):
        assert ref[f"rescore_utt{b}_hyps_in"][j, : in_lens[j]].tolist() == [ref.SOS, *h]
    l2r, r2l = decoder_log_probs(model.decoder, encoder_out, hyps, ref.SOS, ref.EOS, right_to_left=True)
    for j, length in enumerate(in_lens):
        np.testing.assert_allclose(
            l2r[j, :length].numpy(), ref[f"rescore_utt{b}_l2r_log_probs"][j, :length], atol=ref.ATOL, rtol=0
        )
        np.testing.assert_allclose(
            r2l[j, :length].numpy(), ref[f"rescore_utt{b}_r2l_log_probs"][j, :length], atol=ref.ATOL, rtol=0
        )


@pytest.mark.parametrize("mode", list(UPSTREAM_MODE))
def test_batched_equals_one_by_one(recognizer, ref, mode):
    by_batch = {batch: _decode(recognizer, ref.features(), mode, chunk=4, left=2, batch=batch) for batch in (1, 2, 3)}
    for batch in (2, 3):
        for one, many in zip(by_batch[1], by_batch[batch]):
            assert [h.tokens for h in many.nbest] == [h.tokens for h in one.nbest]
            np.testing.assert_allclose([h.score for h in many.nbest], [h.score for h in one.nbest], atol=1e-4, rtol=0)
