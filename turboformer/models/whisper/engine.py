"""The eager engine: runs a ``Whisper`` module step by step over its static cache (CPU, or GPU without graphs).

Decoding talks to an engine through five calls, so the CUDA-graph engine (``graph_engine.py``) can stand in:

- ``encode(mel [n, n_mels, 3000]) -> audio features [n, 1500, C]``
- ``start(audio_features, n_group, pads [rows])``: fill the cross-attention cache for ``n * n_group`` rows;
  row r's prompt is left-padded with ``pads[r]`` tokens
- ``prefill(tokens [rows, L], sot_index [rows]) -> (logits at the last token, logits at <|startoftranscript|>)``
- ``step(tokens [rows], positions [rows]) -> logits [rows, V]``: one new token per row at its position
- ``reorder(rows)``: row i now continues what row ``rows[i]`` held (beam search)
Logits are fp32, on the engine's device (decoding runs its loop there), each call a fresh tensor.
"""

from __future__ import annotations

import torch

from turboformer.models.whisper.model import DecoderCache, Whisper


class EagerEngine:
    def __init__(self, model: Whisper):
        self.model = model.eval()
        self.config = model.config
        self.cache: DecoderCache | None = None
        self.offset = 0  # cache columns written so far (the same for every row: prompts are left-padded)

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.dtype

    @torch.inference_mode()
    def encode(self, mel: torch.Tensor) -> torch.Tensor:
        return self.model.encoder(mel.to(self.device, self.dtype))

    @torch.inference_mode()
    def start(self, audio_features: torch.Tensor, n_group: int, pads: torch.Tensor) -> None:
        rows = audio_features.shape[0] * n_group
        if self.cache is None or self.cache.batch != rows:  # keep one cache per batch size in use
            self.cache = self.model.new_cache(rows)
        columns = torch.arange(self.config.n_text_ctx, device=self.device)
        self.cache.key_valid.copy_(columns[None, :] >= pads.to(self.device)[:, None])
        self.model.decoder.fill_cross_cache(audio_features.repeat_interleave(n_group, dim=0), self.cache)
        self.pads = pads
        self.offset = 0

    @torch.inference_mode()
    def prefill(self, tokens: torch.Tensor, sot_index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        width = tokens.shape[1]
        positions = (torch.arange(width)[None, :] - self.pads[:, None]).clamp(min=0)
        logits = self.model.decoder(tokens.to(self.device), positions.to(self.device), self.cache, 0).cpu()
        self.offset = width
        return logits[:, -1], logits[torch.arange(tokens.shape[0]), sot_index]

    @torch.inference_mode()
    def step(self, tokens: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        logits = self.model.decoder(tokens[:, None].to(self.device), positions[:, None].to(self.device), self.cache, self.offset)
        self.offset += 1
        return logits[:, 0].cpu()

    def reorder(self, rows: torch.Tensor) -> None:
        self.cache.reorder(rows.to(self.device))
