"""Translate text with a Lite Transformer model directory: text -> ids -> beam search -> text.

The pipeline follows fairseq 0.8's ``interactive.py``:

* text in: optional Moses tokenisation (``sacremoses``, fairseq's ``--tokenizer moses``: aggressive dash splits,
  escaping), then BPE when the model directory has codes: subword-nmt (``bpecodes``, ``codes`` or ``code``) or
  SentencePiece (``sentencepiece.bpe.model``, ``sentencepiece.model`` or ``spm.model``); then whitespace tokens
  -> ids + ``</s>``;
* batches: sentences sorted by length (stable), ``batch_size`` per batch, sources padded to the longest
  (left by default). The encoder's convolutions see the padding (see :mod:`.model`), so a sentence's result can
  depend slightly on the longest sentence of its batch, exactly as upstream; ``batch_size=1`` makes every
  sentence independent of the others;
* ``max_len = min(max_len_a * padded_source_length + max_len_b, max_target_positions - 1)`` tokens before the
  final ``</s>``;
* text out: symbols without ``</s>``; BPE removed (SentencePiece ``▁`` -> space, else ``@@ `` joins); optional
  Moses detokenisation.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from turboformer.models.lite_transformer.engine import QUANTIZE, EngineOptions, LiteTransformerEngine
from turboformer.models.lite_transformer.generate import BeamSearch, BeamSearchOptions, Hypothesis, SpecialTokens
from turboformer.models.lite_transformer.load import CHECKPOINT_NAME, LoadedModel, load_model_dir
from turboformer.models.lite_transformer.model import DecoderCache, LiteTransformer

SUBWORD_NMT_CODES = ("bpecodes", "codes", "code")
SENTENCEPIECE_MODELS = ("sentencepiece.bpe.model", "sentencepiece.model", "spm.model")
TOKENIZERS = (None, "moses")
BPE_SEPARATOR = "@@ "


class TranslateError(ValueError):
    """Invalid translation options or inputs."""


@dataclass(frozen=True)
class TranslateOptions:
    beam: int = 4  # the repo's WMT evaluation setting
    lenpen: float = 0.6  # the repo's WMT evaluation setting (fairseq's default is 1.0)
    max_len_a: float = 0.0
    max_len_b: int = 200
    nbest: int = 1
    batch_size: int = 16  # sentences per batch; 1 makes each result independent of the other sentences
    min_len: int = 1
    unk_penalty: float = 0.0

    def __post_init__(self) -> None:
        if self.batch_size < 1:
            raise TranslateError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.max_len_a < 0 or self.max_len_b < 0:
            raise TranslateError(f"max_len_a and max_len_b must be >= 0, got {self.max_len_a}, {self.max_len_b}")
        self.search_options()  # validates beam, nbest, min_len

    def search_options(self) -> BeamSearchOptions:
        return BeamSearchOptions(self.beam, self.lenpen, self.min_len, self.nbest, True, self.unk_penalty)


@dataclass(frozen=True)
class TranslatedHypothesis:
    text: str
    tokens: tuple[int, ...]  # target ids, ending with </s>
    score: float  # sum of log-probabilities / len(tokens) ** lenpen
    positional_scores: tuple[float, ...]  # log-probability of each token


@dataclass(frozen=True)
class Translation:
    """The best hypothesis (text, tokens, score, positional_scores) and the ``nbest`` ones, best first."""

    text: str
    tokens: tuple[int, ...]
    score: float
    positional_scores: tuple[float, ...]
    nbest: tuple[TranslatedHypothesis, ...]


class TextProcessor:
    """Text <-> dictionary tokens: optional Moses (de)tokenisation and the model directory's BPE."""

    def __init__(self, model_dir: str | Path, tokenizer: str | None, source_lang: str, target_lang: str) -> None:
        if tokenizer not in TOKENIZERS:
            raise TranslateError(f"tokenizer {tokenizer!r} not supported (choose from {TOKENIZERS})")
        model_dir = Path(model_dir)
        self.moses_tokenizer = self.moses_detokenizer = None
        if tokenizer == "moses":
            from sacremoses import MosesDetokenizer, MosesTokenizer

            self.moses_tokenizer, self.moses_detokenizer = MosesTokenizer(source_lang), MosesDetokenizer(target_lang)
        codes = [model_dir / n for n in SUBWORD_NMT_CODES if (model_dir / n).is_file()]
        spm = [model_dir / n for n in SENTENCEPIECE_MODELS if (model_dir / n).is_file()]
        if len(codes) + len(spm) > 1:
            raise TranslateError(
                f"{model_dir} holds several BPE models ({', '.join(p.name for p in codes + spm)}): keep one"
            )
        self.subword_nmt = self.sentencepiece = None
        if codes:
            from subword_nmt.apply_bpe import BPE

            with open(codes[0], encoding="utf-8") as f:
                self.subword_nmt = BPE(f, separator=BPE_SEPARATOR.strip())
        elif spm:
            import sentencepiece

            self.sentencepiece = sentencepiece.SentencePieceProcessor(model_file=str(spm[0]))

    def encode(self, text: str) -> str:
        """Raw text -> space-separated dictionary symbols."""
        if self.moses_tokenizer is not None:
            text = self.moses_tokenizer.tokenize(text, aggressive_dash_splits=True, return_str=True, escape=True)
        if self.subword_nmt is not None:
            text = self.subword_nmt.process_line(text)
        elif self.sentencepiece is not None:
            text = " ".join(self.sentencepiece.encode(text, out_type=str))
        return text

    def decode(self, symbols: str) -> str:
        """Space-separated dictionary symbols -> text."""
        if self.sentencepiece is not None:
            text = symbols.replace(" ", "").replace("\u2581", " ").strip()
        else:
            text = (symbols + " ").replace(BPE_SEPARATOR, "").rstrip()
        if self.moses_detokenizer is not None:
            text = self.moses_detokenizer.detokenize(text.split())
        return text


class _CachedDecoder:
    """:class:`.generate.IncrementalDecoder` over the model's decoder and a static cache."""

    def __init__(self, model: LiteTransformer, cache: DecoderCache) -> None:
        self.model, self.cache = model, cache

    def log_probs(self, tokens: Tensor) -> Tensor:
        return self.model.log_probs(self.model.decoder.step(tokens[:, -1], self.cache))

    def reorder(self, order: Tensor) -> None:
        self.cache.reorder(order)


class LiteTransformerTranslator:
    """A loaded model with its dictionaries and text processing; stateless between calls.

    On CPU, the reference path (the model's modules and :class:`.generate.BeamSearch`; ``dtype`` other than
    float32 there only simulates reduced precision, as ``turboformer eval`` does). On CUDA, the
    :class:`.engine.LiteTransformerEngine` (CUDA-graphed steps, device-side beam search) in ``dtype``
    (float16, bfloat16 or float32) with optional ``quantize="int8"`` weight-only decoder linears;
    ``engine=False`` keeps the reference path on CUDA (fp32 eager baseline)."""

    def __init__(
        self,
        loaded: LoadedModel,
        text: TextProcessor,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        quantize: str | None = None,
        engine: bool | None = None,
        engine_options: EngineOptions | None = None,
    ) -> None:
        self.device = torch.device(device)
        if quantize not in QUANTIZE:
            raise TranslateError(f"quantize must be one of {QUANTIZE}, got {quantize!r}")
        use_engine = self.device.type == "cuda" if engine is None else engine
        if self.device.type != "cuda" and quantize is not None:
            raise TranslateError(f"quantize={quantize!r} needs a CUDA device (got {self.device})")
        if not use_engine and quantize is not None:
            raise TranslateError("quantize needs the engine (engine=False runs the reference path)")
        self.src_dict, self.tgt_dict = loaded.src_dict, loaded.tgt_dict
        self.text = text
        d = self.tgt_dict
        self.special = SpecialTokens(eos=d.eos, pad=d.pad, unk=d.unk, start=d.eos)
        self.engine: LiteTransformerEngine | None = None
        if use_engine:
            options = engine_options or EngineOptions(dtype=dtype, quantize=quantize)
            self.engine = LiteTransformerEngine(loaded.model, self.special, options, self.device)
            self.model = self.engine.model
        else:
            self.model = loaded.model.to(device=self.device, dtype=dtype).eval()

    @classmethod
    def from_dir(
        cls,
        model_dir: str | Path,
        device: str | torch.device = "cpu",
        dtype: torch.dtype = torch.float32,
        tokenizer: str | None = None,
        checkpoint: str = CHECKPOINT_NAME,
        quantize: str | None = None,
        engine: bool | None = None,
    ) -> LiteTransformerTranslator:
        """Load ``model_dir`` (checkpoint, dictionaries, optional BPE model); ``tokenizer="moses"`` adds Moses
        tokenisation for the checkpoint's source/target languages. See the class for device/dtype/quantize."""
        loaded = load_model_dir(model_dir, checkpoint)
        text = TextProcessor(model_dir, tokenizer, loaded.args.source_lang, loaded.args.target_lang)
        return cls(loaded, text, device, dtype, quantize, engine)

    @torch.inference_mode()
    def generate(self, src_tokens: Tensor, options: TranslateOptions = TranslateOptions()) -> list[list[Hypothesis]]:
        """Beam search for one padded batch src_tokens [B, S] (rows end with </s>) -> nbest hypotheses per row."""
        src_tokens = src_tokens.to(self.device)
        B, S = src_tokens.shape
        max_len = min(int(options.max_len_a * S + options.max_len_b), self.model.decoder.max_positions - 1)
        if self.engine is not None:
            return self.engine.generate(src_tokens, options.search_options(), max_len)
        encoder_out = self.model.encoder(src_tokens)
        beam_rows = torch.arange(B, device=self.device).repeat_interleave(options.beam)  # sentence b -> beam rows
        cache = self.model.decoder.new_cache(encoder_out.index_select(beam_rows), max_len + 1)
        search = BeamSearch(options.search_options(), self.special)
        return search(_CachedDecoder(self.model, cache), B, max_len, self.device)

    def translate_ids(
        self, sources: Sequence[Sequence[int]], options: TranslateOptions = TranslateOptions()
    ) -> list[list[Hypothesis]]:
        """Source id lists (each ending with </s>) -> nbest hypotheses each, batched as fairseq does."""
        limit = self.model.encoder.max_positions
        for i, ids in enumerate(sources):
            if not ids or ids[-1] != self.src_dict.eos:
                raise TranslateError(f"source {i} must end with </s> (id {self.src_dict.eos})")
            if len(ids) > limit:
                raise TranslateError(f"source {i} has {len(ids)} tokens (with </s>), more than the model's {limit}")
        order = sorted(range(len(sources)), key=lambda i: len(sources[i]))  # stable, as fairseq's mergesort
        results: list[list[Hypothesis]] = [[] for _ in sources]
        for start in range(0, len(order), options.batch_size):
            batch = order[start : start + options.batch_size]
            src_tokens = collate([sources[i] for i in batch], self.src_dict.pad, self.model.config.left_pad_source)
            for i, hypotheses in zip(batch, self.generate(src_tokens, options)):
                results[i] = hypotheses
        return results

    def translate(self, sentences: Sequence[str], options: TranslateOptions = TranslateOptions()) -> list[Translation]:
        """Sentences -> translations, in input order."""
        if isinstance(sentences, str):
            raise TranslateError("translate takes a list of sentences, not one string")
        sources = [self.src_dict.encode(self.text.encode(s)) for s in sentences]
        return [self._translation(h) for h in self.translate_ids(sources, options)]

    def _translation(self, hypotheses: list[Hypothesis]) -> Translation:
        nbest = tuple(
            TranslatedHypothesis(
                self.text.decode(self.tgt_dict.string(h.tokens)), h.tokens, h.score, h.positional_scores
            )
            for h in hypotheses
        )
        best = nbest[0]
        return Translation(best.text, best.tokens, best.score, best.positional_scores, nbest)


def collate(sources: Sequence[Sequence[int]], pad: int, left_pad: bool = True) -> Tensor:
    """Id lists -> [B, S] int64 padded with ``pad`` to the longest (on the left when ``left_pad``)."""
    S = max(len(ids) for ids in sources)
    out = torch.full((len(sources), S), pad, dtype=torch.long)
    for row, ids in zip(out, sources):
        if left_pad:
            row[S - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        else:
            row[: len(ids)] = torch.tensor(ids, dtype=torch.long)
    return out
