"""Decoding strategies shared by the encoder-decoder models: logit filters, greedy/sampling, beam search, ranking.

The semantics follow openai-whisper's ``decoding.py`` (Radford et al. 2022, Section 4.5 for the temperature
fallback), which the Whisper tests compare against token for token. A decoder never touches a model: it sees
token histories [B, L] and logits [B, V] and asks its ``reorder`` callback to permute whatever per-row state
(the static KV cache) the model keeps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch.distributions import Categorical


class LogitFilter:
    """Edits next-token logits [B, V] in place, given the token histories [B, L]."""

    def apply(self, logits: torch.Tensor, tokens: torch.Tensor) -> None:
        raise NotImplementedError

    def apply_rows(self, logits: torch.Tensor, sampled: torch.Tensor, counts: torch.Tensor) -> None:
        """The same edit for rows at different lengths: sampled [B, n] tokens after each row's prompt, of which
        counts [B] are real (continuous batching, where every row started at its own step)."""
        raise NotImplementedError


class SuppressTokens(LogitFilter):
    def __init__(self, suppress_tokens: Sequence[int]):
        self.suppress_tokens = torch.tensor(list(suppress_tokens), dtype=torch.long)

    def apply(self, logits, tokens):
        if self.suppress_tokens.device != logits.device:  # moved once, then reused every step
            self.suppress_tokens = self.suppress_tokens.to(logits.device)
        logits.index_fill_(1, self.suppress_tokens, -np.inf)

    def apply_rows(self, logits, sampled, counts):
        self.apply(logits, sampled)


class TokenDecoder:
    """Chooses the next tokens. ``update`` returns the extended histories and whether every row is done."""

    def reset(self) -> None:
        pass

    def update(self, tokens, logits, sum_logprobs) -> tuple[torch.Tensor, bool]:
        raise NotImplementedError

    def finalize(self, tokens, sum_logprobs):
        """tokens [n_audio, n_group, L], sum_logprobs [n_audio, n_group] -> candidates and their scores."""
        raise NotImplementedError


def sample_tokens(logits: torch.Tensor, temperature, generator: torch.Generator | None = None) -> torch.Tensor:
    """One token per row drawn from softmax(logits / temperature); temperature a float or a [B, 1] tensor.

    A seeded generator lives on the CPU: then the draw happens there, whatever the logits' device.
    """
    if generator is None:
        return Categorical(logits=logits / temperature).sample()
    if isinstance(temperature, torch.Tensor):
        temperature = temperature.cpu()
    probs = F.softmax(logits.float().cpu() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1).to(logits.device)


class GreedyDecoder(TokenDecoder):
    """Argmax at temperature 0, otherwise sampling from softmax(logits / temperature)."""

    def __init__(self, temperature: float, eot: int, generator: torch.Generator | None = None):
        self.temperature, self.eot, self.generator = temperature, eot, generator

    def update(self, tokens, logits, sum_logprobs):
        if self.temperature == 0:
            next_tokens = logits.argmax(dim=-1)
        else:
            next_tokens = sample_tokens(logits, self.temperature, self.generator)
        logprobs = F.log_softmax(logits.float(), dim=-1)
        current = logprobs[torch.arange(logprobs.shape[0]), next_tokens]
        finished = tokens[:, -1] == self.eot
        sum_logprobs += current * ~finished
        next_tokens[finished] = self.eot
        tokens = torch.cat([tokens, next_tokens[:, None]], dim=-1)
        return tokens, bool((tokens[:, -1] == self.eot).all())

    def finalize(self, tokens, sum_logprobs):
        return F.pad(tokens, (0, 1), value=self.eot), sum_logprobs.tolist()


class BeamSearchDecoder(TokenDecoder):
    """Beam search with patience (Kasai et al. 2022, arXiv 2204.05424), openai-whisper semantics.

    Each of the n_audio inputs owns ``beam_size`` consecutive rows. A step scores ``beam_size + 1`` extensions
    of every live beam, keeps the best ``beam_size`` that do not end, and collects ended ones until
    ``round(beam_size * patience)`` candidates exist for every input.
    """

    def __init__(self, beam_size: int, eot: int, reorder: Callable[[torch.Tensor], None], patience: float = 1.0):
        if beam_size < 1 or patience <= 0:
            raise ValueError(f"beam_size must be >= 1 and patience > 0, got {beam_size} and {patience}")
        self.beam_size, self.eot, self.reorder, self.patience = beam_size, eot, reorder, patience
        self.max_candidates = round(beam_size * patience)
        self.finished: list[dict] | None = None

    def reset(self):
        self.finished = None

    def update(self, tokens, logits, sum_logprobs):
        if tokens.shape[0] % self.beam_size:
            raise ValueError(f"{tokens.shape[0]} rows is not a multiple of the beam size {self.beam_size}")
        n_audio = tokens.shape[0] // self.beam_size
        if self.finished is None:
            self.finished = [{} for _ in range(n_audio)]
        logprobs = F.log_softmax(logits.float(), dim=-1)
        top_logprobs, top_tokens = logprobs.topk(self.beam_size + 1)
        # the running sums stay fp32, as the reference accumulates them
        extended = (sum_logprobs[:, None] + top_logprobs).tolist()
        top_tokens = top_tokens.tolist()
        next_tokens, sources, newly_finished = [], [], []
        for i in range(n_audio):
            scores, origin, finished = {}, {}, {}
            for j in range(self.beam_size):
                row = i * self.beam_size + j
                prefix = tuple(tokens[row].tolist())
                for score, token in zip(extended[row], top_tokens[row]):
                    sequence = prefix + (token,)
                    scores[sequence] = score
                    origin[sequence] = row
            kept = 0
            for sequence in sorted(scores, key=scores.get, reverse=True):
                if sequence[-1] == self.eot:
                    finished[sequence] = scores[sequence]
                else:
                    sum_logprobs[len(next_tokens)] = scores[sequence]
                    next_tokens.append(sequence)
                    sources.append(origin[sequence])
                    kept += 1
                    if kept == self.beam_size:
                        break
            newly_finished.append(finished)
        tokens = torch.tensor(next_tokens, device=tokens.device)
        self.reorder(torch.tensor(sources, device=tokens.device))
        for previous, new in zip(self.finished, newly_finished):
            for sequence in sorted(new, key=new.get, reverse=True):
                if len(previous) >= self.max_candidates:
                    break
                previous[sequence] = new[sequence]
        completed = all(len(candidates) >= self.max_candidates for candidates in self.finished)
        return tokens, completed

    def finalize(self, tokens, sum_logprobs):
        # inputs that did not collect enough ended candidates take their best live beams, closed with eot
        sum_logprobs = sum_logprobs.cpu()
        for i, candidates in enumerate(self.finished):
            if len(candidates) < self.beam_size:
                for j in list(np.argsort(sum_logprobs[i].numpy()))[::-1]:
                    candidates[tuple(tokens[i, j].tolist()) + (self.eot,)] = sum_logprobs[i][j].item()
                    if len(candidates) >= self.beam_size:
                        break
        sequences = [[torch.tensor(seq) for seq in candidates] for candidates in self.finished]
        scores = [list(candidates.values()) for candidates in self.finished]
        return sequences, scores


class MaximumLikelihoodRanker:
    """Picks the candidate with the best length-normalised log-probability.

    length_penalty None: divide by the length; otherwise by the Google NMT penalty ((5 + n) / 6) ** alpha
    (Wu et al. 2016, arXiv 1609.08144, Eq. 14).
    """

    def __init__(self, length_penalty: float | None):
        self.length_penalty = length_penalty

    def rank(self, tokens: list[list[torch.Tensor]], sum_logprobs: list[list[float]]) -> list[int]:
        def score(logprob, length):
            penalty = length if self.length_penalty is None else ((5 + length) / 6) ** self.length_penalty
            return logprob / penalty

        return [
            int(np.argmax([score(lp, len(t)) for lp, t in zip(logprobs, candidates)]))
            for candidates, logprobs in zip(tokens, sum_logprobs)
        ]
