"""Text in, text out: test.src translates to expected_generate.json's hypotheses (ids, scores; text with the BPE
joins removed as fairseq's ``--remove-bpe`` does), batched as fairseq batches; Moses and BPE wiring against the
upstream libraries (sacremoses, subword-nmt, sentencepiece) applied by hand."""

from __future__ import annotations

import io
import os

import pytest
import torch

from turboformer.models.lite_transformer.translate import (
    LiteTransformerTranslator,
    TranslateError,
    TranslateOptions,
)

ATOL = 1e-4


def remove_bpe(text: str) -> str:
    """fairseq 0.8 data_utils.process_bpe_symbol(sentence, '@@ ')."""
    return (text + " ").replace("@@ ", "").rstrip()


def fixture_options(lenpen: float, batch_size: int) -> TranslateOptions:
    return TranslateOptions(beam=4, lenpen=lenpen, max_len_b=10, nbest=4, batch_size=batch_size)


@pytest.fixture(scope="module")
def sources(reference_dir) -> list[str]:
    return (reference_dir / "test.src").read_text().splitlines()


def assert_matches(translation, reference: dict) -> None:
    """One Translation against one {"id", "hypos"} entry of expected_generate.json."""
    assert len(translation.nbest) == len(reference["hypos"])
    for got, want in zip(translation.nbest, reference["hypos"]):
        assert list(got.tokens) == want["tokens"]
        assert got.text == remove_bpe(want["text"])
        assert abs(got.score - want["score"]) <= ATOL
        assert max(abs(a - b) for a, b in zip(got.positional_scores, want["positional_scores"])) <= ATOL
    best = translation.nbest[0]
    assert (translation.text, translation.tokens, translation.score, translation.positional_scores) == (
        best.text,
        best.tokens,
        best.score,
        best.positional_scores,
    )


@pytest.mark.parametrize("lenpen", [0.6, 1.0])
def test_one_batch(translator, sources, expected_generate, lenpen):
    """batch_size 4: the four sentences share one left-padded batch, as in the fixture's generate.py run."""
    translations = translator.translate(sources, fixture_options(lenpen, batch_size=4))
    for reference in expected_generate[f"beam_lenpen{lenpen}"]["batch"]:
        assert_matches(translations[reference["id"]], reference)


def test_batch_size_one(translator, sources, expected_generate):
    translations = translator.translate(sources, fixture_options(0.6, batch_size=1))
    for reference in expected_generate["beam_lenpen0.6_single"]:
        assert_matches(translations[reference["id"]], reference)


def test_batches_group_sentences_by_length(translator, sources, expected_generate):
    """batch_size 2 over lengths {0: 10, 1: 6, 2: 13, 3: 8} (with </s>) gives batches {1, 3} and {0, 2}: sentences 2
    and 3 are the longest of their batch (unpadded, = alone), sentence 0 is padded to 13 (= the 4-sentence batch)."""
    translations = translator.translate(sources, fixture_options(0.6, batch_size=2))
    single = {r["id"]: r for r in expected_generate["beam_lenpen0.6_single"]}
    batched = {r["id"]: r for r in expected_generate["beam_lenpen0.6"]["batch"]}
    assert_matches(translations[2], single[2])
    assert_matches(translations[3], single[3])
    assert_matches(translations[0], batched[0])


def test_default_options_and_empty_input(translator, sources):
    assert translator.translate([]) == []
    translations = translator.translate(sources[:2])
    assert [len(t.nbest) for t in translations] == [1, 1]
    assert all(t.tokens[-1] == 2 and len(t.tokens) <= 201 for t in translations)


@pytest.mark.parametrize(
    "kwargs,message",
    [(dict(batch_size=0), "batch_size"), (dict(beam=2, nbest=3), "nbest"), (dict(max_len_b=-1), "max_len")],
)
def test_bad_options(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TranslateOptions(**kwargs)


def test_bad_inputs(translator):
    with pytest.raises(TranslateError, match="list of sentences"):
        translator.translate("the of")
    with pytest.raises(TranslateError, match="more than the model's 1024"):
        translator.translate(["the " * 1024])
    with pytest.raises(TranslateError, match="must end with </s>"):
        translator.translate_ids([[4, 5]])


def test_moses_tokenizer(reference_dir, translator):
    """tokenizer='moses' equals sacremoses applied by hand (fairseq's settings) around the plain translator."""
    from sacremoses import MosesDetokenizer, MosesTokenizer

    text = 'the other-side of "what" is, in the end'
    moses = LiteTransformerTranslator.from_dir(reference_dir, tokenizer="moses")
    tokenized = MosesTokenizer("src").tokenize(text, aggressive_dash_splits=True, return_str=True, escape=True)
    options = TranslateOptions(max_len_b=10, nbest=2)
    got = moses.translate([text], options)[0]
    plain = translator.translate([tokenized], options)[0]
    assert got.tokens == plain.tokens and got.score == pytest.approx(plain.score, abs=1e-6)
    assert got.text == MosesDetokenizer("tgt").detokenize(plain.text.split())


def _model_dir_with(tmp_path, reference_dir, name: str, content: bytes):
    for file in ("checkpoint.pt", "dict.src.txt", "dict.tgt.txt"):
        os.symlink(reference_dir / file, tmp_path / file)
    (tmp_path / name).write_bytes(content)
    return tmp_path


def test_subword_nmt_codes(tmp_path, reference_dir, translator):
    from subword_nmt.apply_bpe import BPE

    codes = b"#version: 0.2\nt h\nth e</w>\no f</w>\nw h\nwh at</w>\n"
    model_dir = _model_dir_with(tmp_path, reference_dir, "bpecodes", codes)
    text = "the other of what whatever"
    bpe = BPE(io.StringIO(codes.decode()), separator="@@").process_line(text)
    assert "@@" in bpe
    got = LiteTransformerTranslator.from_dir(model_dir).translate([text], TranslateOptions(max_len_b=10))[0]
    plain = translator.translate([bpe], TranslateOptions(max_len_b=10))[0]
    assert got.tokens == plain.tokens and got.text == plain.text


def test_sentencepiece_model(tmp_path, reference_dir, translator, sources):
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sources * 5), model_writer=model, vocab_size=40, model_type="bpe", minloglevel=2
    )
    model_dir = _model_dir_with(tmp_path, reference_dir, "sentencepiece.bpe.model", model.getvalue())
    processor = spm.SentencePieceProcessor(model_proto=model.getvalue())
    text = "the other of what is"
    pieces = " ".join(processor.encode(text, out_type=str))
    got = LiteTransformerTranslator.from_dir(model_dir).translate([text], TranslateOptions(max_len_b=10))[0]
    plain = translator.translate([pieces], TranslateOptions(max_len_b=10))[0]
    assert got.tokens == plain.tokens
    symbols = translator.tgt_dict.string(plain.tokens)
    assert got.text == symbols.replace(" ", "").replace("\u2581", " ").strip()  # fairseq sentencepiece decode


def test_two_bpe_models_are_ambiguous(tmp_path, reference_dir):
    model_dir = _model_dir_with(tmp_path, reference_dir, "bpecodes", b"#version: 0.2\nt h\n")
    (model_dir / "spm.model").write_bytes(b"")
    with pytest.raises(TranslateError, match="several BPE models"):
        LiteTransformerTranslator.from_dir(model_dir)


def test_unknown_tokenizer(reference_dir):
    with pytest.raises(TranslateError, match="tokenizer 'spacy'"):
        LiteTransformerTranslator.from_dir(reference_dir, tokenizer="spacy")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_float32(reference_dir, sources, expected_generate):
    translator = LiteTransformerTranslator.from_dir(reference_dir, device="cuda")
    translations = translator.translate(sources, fixture_options(0.6, batch_size=4))
    for reference in expected_generate["beam_lenpen0.6"]["batch"]:
        assert_matches(translations[reference["id"]], reference)
