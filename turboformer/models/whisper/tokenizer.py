"""Whisper's tokenizer: byte-level BPE over the GPT-2 or Whisper-multilingual vocabulary, plus special tokens.

Text is split into words by the GPT-2 pre-tokenization regex, each word is UTF-8 encoded and merged by
byte-pair encoding (Radford et al. 2019, "Language Models are Unsupervised Multitask Learners", §2.2).
As in ``tiktoken``, the merge rank of a byte sequence is its token id: the pair whose concatenation has the
lowest id is merged first. Special tokens follow the ordinary vocabulary in the multitask layout of
Radford et al. 2022, "Robust Speech Recognition via Large-Scale Weak Supervision", §2.3 and Figure 1::

    eot, sot, <|en|> ... (one per language), translate, transcribe, sot_lm, sot_prev, no_speech,
    no_timestamps, <|0.00|> <|0.02|> ... <|30.00|>

No Hugging Face ``tokenizers`` or ``tiktoken`` at run time: the vocabulary is read from a model directory's
``tokenizer.json`` (Hugging Face), ``vocabulary.txt`` (CTranslate2 / faster-whisper) or a ``.tiktoken`` file
(openai-whisper's ``whisper/assets``). Special-token ids follow openai-whisper's ``whisper/tokenizer.py``.
"""

from __future__ import annotations

import base64
import binascii
import functools
import importlib.util
import json
import operator
import string
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import regex

LANGUAGES: dict[str, str] = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian", "ko": "korean",
    "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish", "pl": "polish", "ca": "catalan",
    "nl": "dutch", "ar": "arabic", "sv": "swedish", "it": "italian", "id": "indonesian", "hi": "hindi",
    "fi": "finnish", "vi": "vietnamese", "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay",
    "cs": "czech", "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian", "la": "latin",
    "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak", "te": "telugu", "fa": "persian",
    "lv": "latvian", "bn": "bengali", "sr": "serbian", "az": "azerbaijani", "sl": "slovenian",
    "kn": "kannada", "et": "estonian", "mk": "macedonian", "br": "breton", "eu": "basque",
    "is": "icelandic", "hy": "armenian", "ne": "nepali", "mn": "mongolian", "bs": "bosnian",
    "kk": "kazakh", "sq": "albanian", "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi",
    "si": "sinhala", "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi", "gu": "gujarati",
    "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek", "fo": "faroese", "ht": "haitian creole",
    "ps": "pashto", "tk": "turkmen", "nn": "nynorsk", "mt": "maltese", "sa": "sanskrit",
    "lb": "luxembourgish", "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy",
    "as": "assamese", "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese",
    "yue": "cantonese",  # added by large-v3 (n_vocab 51866)
}  # code -> name, in the order of the language tokens

# Language code by name, with the aliases openai-whisper accepts.
TO_LANGUAGE_CODE: dict[str, str] = {
    **{name: code for code, name in LANGUAGES.items()},
    "burmese": "my", "valencian": "ca", "flemish": "nl", "haitian": "ht", "letzeburgesch": "lb",
    "pushto": "ps", "panjabi": "pa", "moldavian": "ro", "moldovan": "ro", "sinhalese": "si",
    "castilian": "es", "mandarin": "zh",
}

TASKS = ("transcribe", "translate")

# GPT-2 pre-tokenization: contractions, letters, digits, other symbols, each with at most one leading space;
# a run of spaces gives its last space to the following word.
_WORD_PATTERN = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

N_TIMESTAMPS = 1501  # <|0.00|> ... <|30.00|>
TIMESTAMP_SECONDS = 0.02  # one timestamp step = one encoder output frame (2 mel frames of 10 ms)
# Specials apart from languages and timestamps: eot, sot, translate, transcribe, sot_lm, sot_prev,
# no_speech, no_timestamps.
_N_FIXED_SPECIALS = 8
N_VOCAB_ENGLISH = 51864  # GPT-2's 50256 byte-level tokens + 1608 specials (99 unused language tokens)
N_VOCAB_MULTILINGUAL = 51865  # 50257 byte-level tokens + 1608 specials (99 languages)
N_VOCAB_LARGE_V3 = 51866  # as multilingual, plus <|yue|>

# Languages that are written without spaces: words are split at unicode boundaries (openai-whisper).
_NO_SPACE_LANGUAGES = frozenset({"zh", "ja", "th", "lo", "my", "yue"})

# Older Hugging Face / CTranslate2 vocabularies (e.g. tiny.en's) use earlier names for two specials.
_SPECIAL_ALIASES = {"<|nocaptions|>": "<|nospeech|>", "<|iw|>": "<|he|>"}

_WORD_CACHE_SIZE = 1 << 16  # words (pre-tokenized pieces) whose BPE result is kept


class TokenizerError(ValueError):
    """A vocabulary file, model size, language, task or token id that the tokenizer cannot use."""


@functools.cache
def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's printable stand-ins for bytes: character -> byte (``bytes_to_unicode`` of GPT-2's encoder.py).

    Printable Latin-1 bytes stand for themselves; the other 68 bytes map to U+0100 onwards, in byte order.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    alphabet = {chr(b): b for b in printable}
    others = (b for b in range(256) if b not in alphabet.values())
    alphabet.update({chr(256 + n): b for n, b in enumerate(others)})
    return alphabet


def _byte_level_to_bytes(token: str, where: str) -> bytes:
    """Decodes one byte-level token string (e.g. ``"Ġthe"``) to its bytes (``b" the"``)."""
    alphabet = _byte_level_alphabet()
    try:
        return bytes(alphabet[c] for c in token)
    except KeyError as missing:
        raise TokenizerError(
            f"{where}: token {token!r} has the character {missing.args[0]!r}, which is not in GPT-2's "
            "byte-level alphabet; is this a Whisper (byte-level BPE) vocabulary?"
        ) from None


@dataclass(frozen=True)
class SpecialTokens:
    """Ids of Whisper's special tokens; all lie at or above ``eot``, which follows the byte-level tokens."""

    eot: int  # <|endoftext|>
    sot: int  # <|startoftranscript|>
    sot_lm: int  # <|startoflm|>
    sot_prev: int  # <|startofprev|>: the previous window's text follows as a prompt
    no_speech: int  # <|nospeech|> (<|nocaptions|> in older Hugging Face files)
    no_timestamps: int  # <|notimestamps|>
    timestamp_begin: int  # <|0.00|>; <|t|> = timestamp_begin + round(t / 0.02)
    translate: int  # <|translate|>
    transcribe: int  # <|transcribe|>
    language_tokens: tuple[int, ...]  # <|en|>, <|zh|>, ... in LANGUAGES order

    @classmethod
    def for_layout(cls, eot: int, num_languages: int) -> SpecialTokens:
        """The ids of the layout ``eot, sot, languages..., translate, transcribe, sot_lm, sot_prev,
        no_speech, no_timestamps, timestamps...`` (openai-whisper ``get_encoding``)."""
        after = eot + 2 + num_languages  # first id after the language tokens
        return cls(
            eot=eot,
            sot=eot + 1,
            language_tokens=tuple(range(eot + 2, after)),
            translate=after,
            transcribe=after + 1,
            sot_lm=after + 2,
            sot_prev=after + 3,
            no_speech=after + 4,
            no_timestamps=after + 5,
            timestamp_begin=after + 6,
        )

    def texts(self) -> tuple[str, ...]:
        """Literal text of every special token, indexed by ``id - eot`` (as openai-whisper writes them)."""
        languages = tuple(LANGUAGES)[: len(self.language_tokens)]
        return (
            "<|endoftext|>",
            "<|startoftranscript|>",
            *(f"<|{code}|>" for code in languages),
            "<|translate|>",
            "<|transcribe|>",
            "<|startoflm|>",
            "<|startofprev|>",
            "<|nospeech|>",
            "<|notimestamps|>",
            *(f"<|{i * TIMESTAMP_SECONDS:.2f}|>" for i in range(N_TIMESTAMPS)),
        )


@functools.cache
def _all_special_texts() -> frozenset[str]:
    """Every literal special token of any Whisper vocabulary (100 languages, aliases included)."""
    largest = SpecialTokens.for_layout(eot=0, num_languages=len(LANGUAGES))
    return frozenset(largest.texts()) | _SPECIAL_ALIASES.keys()


@dataclass(frozen=True)
class _Vocabulary:
    """What a vocabulary file holds: byte-level tokens by rank (= id), and literal special tokens."""

    ranks: dict[bytes, int]  # token bytes -> id, for the ordinary (byte-level BPE) tokens
    specials: dict[str, int]  # literal special token text -> id, as written in the file (may be empty)
    source: str  # where it came from, for error messages


def _split_literal_specials(entries: Iterable[tuple[str, int]], source: str, extra_specials: set[str]) -> _Vocabulary:
    """Separates Whisper's literal special tokens (``<|en|>``) from byte-level tokens and decodes the latter."""
    special_texts = _all_special_texts() | extra_specials
    ranks: dict[bytes, int] = {}
    specials: dict[str, int] = {}
    for text, token_id in entries:
        if text in special_texts:
            specials[text] = token_id
        else:
            ranks[_byte_level_to_bytes(text, f"{source} (id {token_id})")] = token_id
    return _Vocabulary(ranks, specials, source)


def _read_tiktoken(path: Path, text: str) -> _Vocabulary:
    """``<base64 token bytes> <rank>`` per line (openai-whisper's ``whisper/assets/*.tiktoken``)."""
    ranks: dict[bytes, int] = {}
    for line_number, line in enumerate(text.splitlines(), start=1):
        if not line:
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token)] = int(rank)  # as openai-whisper: "=" is b""
        except (ValueError, binascii.Error):
            raise TokenizerError(f"{path}:{line_number}: expected '<base64 token> <rank>', got {line!r}") from None
    return _Vocabulary(ranks, {}, str(path))


def _read_vocabulary_txt(path: Path, text: str) -> _Vocabulary:
    """One byte-level token per line, line number = id (CTranslate2); specials written literally."""
    lines = text.split("\n")
    if lines[-1] == "":  # the newline that ends the last line; an empty line inside is a token (b"")
        lines.pop()
    return _split_literal_specials(((line, i) for i, line in enumerate(lines)), str(path), set())


def _read_tokenizer_json(path: Path, text: str) -> _Vocabulary:
    """Hugging Face ``tokenizer.json``: ``model.vocab`` (byte-level string -> id) and ``added_tokens``."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise TokenizerError(f"{path}: not valid JSON ({error})") from None
    model = data.get("model") if isinstance(data, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise TokenizerError(f"{path}: expected a Hugging Face tokenizer.json with a BPE model and 'model.vocab'")
    # Anything that rewrites text before BPE would make our encoding differ from the file's intent.
    pre = data.get("pre_tokenizer") or {}
    if data.get("normalizer") is not None or pre.get("type") != "ByteLevel" or pre.get("add_prefix_space"):
        raise TokenizerError(
            f"{path}: expected GPT-2 byte-level pre-tokenization (normalizer null, pre_tokenizer ByteLevel "
            f"without add_prefix_space), got normalizer={data.get('normalizer')!r}, pre_tokenizer={pre!r}"
        )
    added = {token["content"]: token["id"] for token in data.get("added_tokens", [])}
    entries = [*model["vocab"].items(), *((t, i) for t, i in added.items() if t not in model["vocab"])]
    return _split_literal_specials(entries, str(path), set(added))


def _read_vocabulary(path: str | Path) -> _Vocabulary:
    """Reads any of the three formats, told apart by content: JSON object, ``base64 rank`` lines, or tokens."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(f"vocabulary file not found: {path}")
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("{"):
        return _read_tokenizer_json(path, text)
    # A byte-level token never holds a space (it is written "Ġ"), a tiktoken line always does.
    if " " in text.split("\n", 1)[0]:
        return _read_tiktoken(path, text)
    return _read_vocabulary_txt(path, text)


def _layout(n_vocab: int) -> tuple[bool, int]:
    """(multilingual, num_languages) of a Whisper model with ``n_vocab`` output tokens (openai-whisper)."""
    if not _is_integer(n_vocab) or n_vocab not in (N_VOCAB_ENGLISH, N_VOCAB_MULTILINGUAL, N_VOCAB_LARGE_V3):
        raise TokenizerError(
            f"n_vocab={n_vocab!r} is not a Whisper vocabulary size: expected {N_VOCAB_ENGLISH} (English-only), "
            f"{N_VOCAB_MULTILINGUAL} (multilingual, 99 languages) or {N_VOCAB_LARGE_V3} (large-v3, 100 languages)"
        )
    multilingual = n_vocab >= N_VOCAB_MULTILINGUAL
    # 51765 = 50256 GPT-2 tokens + 8 fixed specials + 1501 timestamps; multilingual adds one byte-level token.
    return multilingual, n_vocab - 51765 - int(multilingual)


def _is_integer(value) -> bool:
    """True for Python, NumPy and 0-d tensor integers (not bools, floats or strings)."""
    try:
        operator.index(value)
    except TypeError:
        return False
    return not isinstance(value, bool)


class WhisperTokenizer:
    """Byte-level BPE encoder/decoder and special tokens for one Whisper model size.

    Attributes:
        n_vocab: number of output tokens of the model (logits width).
        multilingual: False for the English-only (``*.en``) models.
        num_languages: number of language tokens (99; 100 from large-v3).
        languages: language codes in token order (``LANGUAGES`` cut to ``num_languages``).
        special: ids of the special tokens.
    """

    def __init__(self, ranks: Mapping[bytes, int], n_vocab: int, *, literal_specials: Mapping[str, int] | None = None,
                 source: str = "<ranks>"):
        """Checks that ``ranks`` (byte-level token -> id, also its merge rank) and the special tokens written in
        the vocabulary file (``literal_specials``, text -> id) fit a Whisper model with ``n_vocab`` outputs."""
        self.multilingual, self.num_languages = _layout(n_vocab)
        self.n_vocab = n_vocab = operator.index(n_vocab)
        self.languages: tuple[str, ...] = tuple(LANGUAGES)[: self.num_languages]
        kind = f"{'a multilingual' if self.multilingual else 'an English-only'} Whisper model (n_vocab={n_vocab})"

        eot = n_vocab - _N_FIXED_SPECIALS - self.num_languages - N_TIMESTAMPS  # 50256 English-only, else 50257
        if len(ranks) != eot or set(ranks.values()) != set(range(eot)):
            raise TokenizerError(
                f"{source}: {kind} needs byte-level tokens with ids 0..{eot - 1} ({eot} tokens: "
                f"{'GPT-2' if not self.multilingual else 'Whisper multilingual'} vocabulary), but the file has "
                f"{len(ranks)} with ids {min(ranks.values(), default=None)}..{max(ranks.values(), default=None)}; "
                "is it the tokenizer of another model?"
            )
        missing_bytes = [b for b in range(256) if bytes([b]) not in ranks]
        if missing_bytes:
            raise TokenizerError(f"{source}: byte-level vocabulary lacks the single bytes {missing_bytes[:8]}")

        self.special = SpecialTokens.for_layout(eot, self.num_languages)
        self._special_texts = self.special.texts()  # by id - eot
        self._check_literal_specials(literal_specials or {}, source, kind)

        self._ranks = dict(ranks)
        self._token_bytes: list[bytes] = [b""] * eot  # id -> bytes
        for token, token_id in ranks.items():
            self._token_bytes[token_id] = token
        self._special_bytes = [text.encode() for text in self._special_texts]
        self._encode_word = functools.lru_cache(maxsize=_WORD_CACHE_SIZE)(self._byte_pair_merge)

    def _check_literal_specials(self, literal_specials: Mapping[str, int], source: str, kind: str) -> None:
        """Every special token the file writes must sit where this model's layout puts it."""
        expected = {text: self.special.eot + i for i, text in enumerate(self._special_texts)}
        for text, token_id in literal_specials.items():
            want = expected.get(_SPECIAL_ALIASES.get(text, text))
            if want is None:
                raise TokenizerError(
                    f"{source}: special token {text!r} (id {token_id}) does not exist in {kind}, which has "
                    f"{self.num_languages} languages; is it the tokenizer of another model?"
                )
            if want != token_id:
                raise TokenizerError(
                    f"{source}: special token {text!r} has id {token_id}, but {kind} puts it at {want}; "
                    "is it the tokenizer of another model?"
                )

    # ----------------------------------------------------------------------------------------- construction

    @classmethod
    def from_file(cls, path: str | Path, n_vocab: int) -> WhisperTokenizer:
        """Loads ``tokenizer.json``, ``vocabulary.txt`` or a ``.tiktoken`` file (told apart by content)."""
        vocabulary = _read_vocabulary(path)
        return cls(vocabulary.ranks, n_vocab, literal_specials=vocabulary.specials, source=vocabulary.source)

    @classmethod
    def from_dir(cls, model_dir: str | Path, n_vocab: int) -> WhisperTokenizer:
        """Loads a model directory's ``tokenizer.json``, else its ``vocabulary.txt``."""
        model_dir = Path(model_dir)
        if not model_dir.is_dir():
            raise TokenizerError(f"model directory not found: {model_dir}")
        for name in ("tokenizer.json", "vocabulary.txt"):
            if (model_dir / name).is_file():
                return cls.from_file(model_dir / name, n_vocab)
        raise TokenizerError(
            f"{model_dir} has no tokenizer: expected tokenizer.json (Hugging Face) or vocabulary.txt "
            "(CTranslate2); a .tiktoken file can be loaded with WhisperTokenizer.from_file"
        )

    @classmethod
    def from_openai_assets(cls, n_vocab: int) -> WhisperTokenizer:
        """Loads ``gpt2.tiktoken`` (English-only) or ``multilingual.tiktoken`` from an installed openai-whisper."""
        multilingual, _ = _layout(n_vocab)
        name = "multilingual.tiktoken" if multilingual else "gpt2.tiktoken"
        spec = importlib.util.find_spec("whisper")
        asset = Path(spec.origin).parent / "assets" / name if spec and spec.origin else None
        if asset is None or not asset.is_file():
            raise TokenizerError(
                f"openai-whisper's {name} not found (pip install openai-whisper), or give the model's "
                "tokenizer.json / vocabulary.txt to WhisperTokenizer.from_dir or from_file"
            )
        return cls.from_file(asset, n_vocab)

    # ----------------------------------------------------------------------------------------------- encode

    def _byte_pair_merge(self, word: bytes) -> tuple[int, ...]:
        """BPE of one pre-tokenized word: repeatedly merge the adjacent pair whose concatenation has the lowest
        rank (the leftmost on ties), as tiktoken does. O(len(word)^2) list scans, run in C; words are short."""
        ranks = self._ranks
        whole = ranks.get(word)
        if whole is not None:
            return (whole,)
        none = sys.maxsize  # rank of a pair that is not a token
        starts = list(range(len(word) + 1))  # part i is word[starts[i]:starts[i + 1]]
        pair_ranks = [ranks.get(word[i : i + 2], none) for i in range(len(word) - 1)]  # pair i = parts i, i+1
        while pair_ranks:
            best = min(pair_ranks)
            if best == none:
                break
            i = pair_ranks.index(best)
            del starts[i + 1], pair_ranks[i]
            if i > 0:
                pair_ranks[i - 1] = ranks.get(word[starts[i - 1] : starts[i + 1]], none)
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(word[starts[i] : starts[i + 2]], none)
        return tuple(ranks[word[a:b]] for a, b in zip(starts, starts[1:]))

    def encode(self, text: str) -> list[int]:
        """Token ids of ordinary text; special-token text such as ``<|en|>`` is encoded as plain characters."""
        if not isinstance(text, str):
            raise TokenizerError(f"encode expects a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: replace them by U+FFFD, as tiktoken does
            text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        tokens: list[int] = []
        for word in _WORD_PATTERN.findall(text):
            tokens.extend(self._encode_word(word.encode("utf-8")))
        return tokens

    # ----------------------------------------------------------------------------------------------- decode

    def _ids(self, tokens) -> list[int]:
        """Token ids as a list of ints (from any iterable of ints, or a 1-D tensor/array via ``tolist``)."""
        ids = tokens.tolist() if hasattr(tokens, "tolist") else list(tokens)
        for token in ids:
            if not _is_integer(token) or not 0 <= token < self.n_vocab:
                raise TokenizerError(f"token {token!r} is not an id of this vocabulary (0..{self.n_vocab - 1})")
        return [operator.index(token) for token in ids]

    def decode(self, tokens) -> str:
        """Text of the ordinary tokens; special and timestamp tokens (ids >= eot) are dropped. Byte sequences
        that are not valid UTF-8 (a character cut between tokens) become U+FFFD."""
        eot, token_bytes = self.special.eot, self._token_bytes
        data = b"".join(token_bytes[t] for t in self._ids(tokens) if t < eot)
        return data.decode("utf-8", errors="replace")

    def decode_with_timestamps(self, tokens) -> str:
        """Text of all tokens, special ones written literally: ``<|startoftranscript|>``, ``<|1.08|>``."""
        eot, token_bytes, special_bytes = self.special.eot, self._token_bytes, self._special_bytes
        data = b"".join(token_bytes[t] if t < eot else special_bytes[t - eot] for t in self._ids(tokens))
        return data.decode("utf-8", errors="replace")

    # ------------------------------------------------------------------------------------ special sequences

    def _language_code(self, language: str) -> str:
        """A language code of this model from a code or a name ("de", "German"), or a clear error."""
        if not isinstance(language, str):
            raise TokenizerError(f"language must be a str such as 'en', got {language!r}")
        code = TO_LANGUAGE_CODE.get(language.lower(), language.lower())
        if code not in LANGUAGES:
            raise TokenizerError(f"unknown language {language!r}; known codes: {', '.join(self.languages)}")
        if not self.multilingual and code != "en":
            raise TokenizerError(f"this English-only model cannot take language {language!r}; use 'en' or None")
        if code not in self.languages:
            raise TokenizerError(
                f"language {language!r} needs a model with more language tokens (this one has {self.num_languages})"
            )
        return code

    def language_token(self, code: str) -> int:
        """Id of ``<|code|>`` (a name such as "german" is accepted too)."""
        return self.special.language_tokens[self.languages.index(self._language_code(code))]

    def sot_sequence(self, language: str | None, task: str = "transcribe") -> tuple[int, ...]:
        """The decoder prompt: ``(sot,)`` for English-only models; ``(sot, language, task)`` for multilingual
        ones, or ``(sot,)`` when ``language`` is None (not known yet: the model predicts it next)."""
        if task not in TASKS:
            raise TokenizerError(f"unknown task {task!r}; expected one of {TASKS}")
        if language is not None:
            language = self._language_code(language)
        if not self.multilingual:
            if task != "transcribe":
                raise TokenizerError("English-only models can only transcribe; use a multilingual model to translate")
            return (self.special.sot,)
        if language is None:
            return (self.special.sot,)
        task_token = self.special.transcribe if task == "transcribe" else self.special.translate
        return (self.special.sot, self.language_token(language), task_token)

    @functools.cached_property
    def _non_speech_tokens(self) -> tuple[int, ...]:
        # Symbols of speaker tags and non-speech annotations ("♪♪♪", "( SPEAKING FOREIGN LANGUAGE )",
        # "[DAVID] Hey there,"); plain punctuation stays allowed (openai-whisper ``non_speech_tokens``).
        symbols = list('"#()*+/:;<=>@[\\]^_`{|}~「」『』')
        symbols += "<< >> <<< >>> -- --- -( -[ (' (\" (( )) ((( ))) [[ ]] {{ }} ♪♪ ♪♪♪".split()
        # U+2640..U+267F symbols share their first two UTF-8 bytes: suppressing the first token is safe
        # even where the symbol takes several tokens.
        miscellaneous = set("♩♪♫♬♭♮♯")
        # "-" and "'" stay allowed inside words, not at their start.
        result = {self.encode(" -")[0], self.encode(" '")[0]}
        for symbol in symbols + list(miscellaneous):
            for tokens in (self.encode(symbol), self.encode(" " + symbol)):
                if len(tokens) == 1 or symbol in miscellaneous:
                    result.add(tokens[0])
        return tuple(sorted(result))

    def non_speech_tokens(self) -> tuple[int, ...]:
        """Ids to suppress so that speaker tags and non-speech annotations are not generated (sorted)."""
        return self._non_speech_tokens

    # --------------------------------------------------------------------------------------- word splitting

    def split_to_word_tokens(self, tokens, language: str | None = None) -> tuple[list[str], list[list[int]]]:
        """Groups tokens into words: ``(words, tokens of each word)``; the words joined give
        ``decode_with_timestamps(tokens)``. Words start at a space, a punctuation mark or a special token; for
        languages written without spaces (zh, ja, th, lo, my, yue) every complete character is a word."""
        if language is not None and self._language_code(language) in _NO_SPACE_LANGUAGES:
            return self._split_tokens_on_unicode(self._ids(tokens))
        return self._split_tokens_on_spaces(self._ids(tokens))

    def _split_tokens_on_unicode(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Cuts after every token where the text decoded so far holds no partial UTF-8 character."""
        decoded_full = self.decode_with_timestamps(tokens)
        replacement_char = "\ufffd"
        words: list[str] = []
        word_tokens: list[list[int]] = []
        current_tokens: list[int] = []
        unicode_offset = 0  # characters of decoded_full consumed by the words so far
        for token in tokens:
            current_tokens.append(token)
            decoded = self.decode_with_timestamps(current_tokens)
            # A U+FFFD is a cut character unless the full text has one at that place too.
            if (
                replacement_char not in decoded
                or decoded_full[unicode_offset + decoded.index(replacement_char)] == replacement_char
            ):
                words.append(decoded)
                word_tokens.append(current_tokens)
                current_tokens = []
                unicode_offset += len(decoded)
        return words, word_tokens

    def _split_tokens_on_spaces(self, tokens: list[int]) -> tuple[list[str], list[list[int]]]:
        """Joins unicode pieces into words that begin at a space, a punctuation mark or a special token."""
        words: list[str] = []
        word_tokens: list[list[int]] = []
        for subword, subword_tokens in zip(*self._split_tokens_on_unicode(tokens)):
            special = subword_tokens[0] >= self.special.eot
            with_space = subword.startswith(" ")
            punctuation = subword.strip() in string.punctuation
            if special or with_space or punctuation or not words:
                words.append(subword)
                word_tokens.append(subword_tokens)
            else:
                words[-1] += subword
                word_tokens[-1].extend(subword_tokens)
        return words, word_tokens

    def __repr__(self) -> str:
        kind = "multilingual" if self.multilingual else "English-only"
        return f"WhisperTokenizer(n_vocab={self.n_vocab}, {kind}, {self.num_languages} languages)"
