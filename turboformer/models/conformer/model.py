"""The U2/U2++ model: a Conformer encoder shared by a CTC head and an attention decoder (WeNet ``ASRModel``).

Parts are built by the caller and passed in (see :func:`build_model`); decoding strategies live in
``ctc.py`` and ``search.py``, the stateful recognizer in ``recognize.py``.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import ConformerConfig
from .ctc import CTC
from .decoder import BiTransformerDecoder
from .encoder import ConformerEncoder, ConformerInputError


class ConformerASR(nn.Module):
    """Encoder + CTC + (bi-)transformer decoder, with the token ids that decoding needs."""

    def __init__(self, config: ConformerConfig, encoder: ConformerEncoder, ctc: CTC, decoder: BiTransformerDecoder):
        super().__init__()
        self.config = config
        self.encoder = encoder
        self.ctc = ctc
        self.decoder = decoder

    def check_features(self, feats: torch.Tensor, lengths: torch.Tensor) -> None:
        """Raise :class:`ConformerInputError` unless ``feats`` [B, T, F] / ``lengths`` [B] can be encoded."""
        dim = self.config.encoder.input_dim
        if feats.dim() != 3 or feats.size(-1) != dim:
            raise ConformerInputError(f"features must be [batch, frames, {dim}], got {tuple(feats.shape)}")
        if lengths.dim() != 1 or lengths.size(0) != feats.size(0):
            raise ConformerInputError(f"lengths must be [{feats.size(0)}], got {tuple(lengths.shape)}")
        need = self.config.encoder.right_context + 1
        shortest, longest = int(lengths.min()), int(lengths.max())
        if shortest < need:
            raise ConformerInputError(
                f"an input has {shortest} feature frames; the {self.config.encoder.input_layer} front-end needs "
                f"at least {need} (~{(need - 1) * 10 + 25} ms of audio)"
            )
        if longest > feats.size(1):
            raise ConformerInputError(f"a length ({longest}) exceeds the padded feature length ({feats.size(1)})")

    def encode(
        self,
        feats: torch.Tensor,
        lengths: torch.Tensor,
        chunk_size: int = -1,
        left_chunks: int = -1,
        simulate_streaming: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encoder states [B, T', D] and valid lengths [B] for raw fbank ``feats`` [B, T, F].

        ``simulate_streaming`` (with ``chunk_size > 0``) runs each utterance through the cached
        chunk-by-chunk path (WeNet ``forward_chunk_by_chunk``) instead of chunk-masked attention.
        """
        self.check_features(feats, lengths)
        if not (simulate_streaming and chunk_size > 0):
            return self.encoder(feats, lengths, chunk_size, left_chunks)
        outputs = [
            self.encoder.forward_chunk_by_chunk(feats[b : b + 1, :length], chunk_size, left_chunks)[0]
            for b, length in enumerate(lengths.tolist())
        ]
        out_lengths = torch.tensor([o.size(0) for o in outputs], device=feats.device)
        return nn.utils.rnn.pad_sequence(outputs, batch_first=True), out_lengths


def build_model(config: ConformerConfig) -> ConformerASR:
    """An (uninitialised) model with the shapes of ``config``; load weights with ``load.py``."""
    config.validate()
    d_model = config.encoder.output_size
    return ConformerASR(
        config,
        ConformerEncoder(config.encoder),
        CTC(config.vocab_size, d_model),
        BiTransformerDecoder(config.vocab_size, d_model, config.decoder),
    )
