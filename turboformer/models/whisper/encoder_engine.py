"""The audio encoder on the GPU: fused residual + LayerNorm passes, one CUDA graph per batch bucket.

The arithmetic is the encoder's of ``model.py`` (openai-whisper's): an fp32 residual stream, fp16/bf16 matmuls
with fp32 accumulation, LayerNorm statistics in fp32. What changes is how many passes over memory it takes. Per
block, eagerly, the module reads and writes its [n, 1500, C] activations about a dozen times (LayerNorm in fp32
then a cast, the residual adds, the GELU after its matmul); here a block is

    h = LN1(x)                                   (fused into the previous block's last residual add)
    q, k, v = h @ Wqkv + b                       one GEMM; SDPA reads q, k, v as strided views
    x, h = x + attn @ Wo + bo, LN2(...)          GEMM with fp32 output, then one Triton pass: add_layer_norm
    f = GELU(h @ W1 + b1)                        GEMM, then bias + exact GELU in one Triton pass
    x, h = x + f @ W2 + b2, LN1'(...)            GEMM with fp32 output, add_layer_norm (LN1 of the next block,
                                                 or ln_post)

The two matmuls whose results join the fp32 residual stream write fp32 (cuBLAS's fp32 accumulator, not rounded
to fp16/bf16 first): the module rounds each branch to the compute dtype before the add, which in bf16 throws
away all but 8 bits of every block's contribution. It costs one wider write and read per branch (~3% of the
large-v3 encoder at batch 16) and is where the engine is more exact than the module it replaces.

The whole encoder (conv stem included) is captured as a CUDA graph for each batch bucket on its first use, so
a small model's ~15 launches per block replay without host gaps. A batch that is not a bucket runs as a sum of
buckets (13 windows: 8 + 4 + 1) rather than padding windows that would be computed and thrown away.

Where CUDA is absent (or graphs are off) the same code runs eagerly and the kernels dispatch to their PyTorch
references: that is how CPU tests check it against the module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from turboformer.kernels.bias_gelu import bias_gelu
from turboformer.kernels.layer_norm import add_layer_norm, layer_norm
from turboformer.models.whisper.model import AudioEncoder, merge_heads, split_heads
from turboformer.nn.linear import linear_fp32_out
from turboformer.runtime.cuda_graphs import PaddedGraphs


def weight_and_bias(module, dtype: torch.dtype, bias_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, ...]:
    """A Linear's, Conv's or LayerNorm's (weight, bias), detached and contiguous in ``dtype`` (the bias in
    ``bias_dtype`` when given)."""
    weight, bias = module.weight.detach(), module.bias.detach()
    return weight.to(dtype).contiguous(), bias.to(bias_dtype or dtype).contiguous()


class _Block:
    """One encoder block's weights in the engine dtype ([out, in] matrices, as F.linear takes them); the biases of
    the two matmuls that feed the fp32 residual stream stay fp32."""

    def __init__(self, block, dtype: torch.dtype):
        self.attn_ln = weight_and_bias(block.attn_ln, dtype)
        self.qkv = weight_and_bias(block.attn.qkv, dtype)  # [3C, C]
        self.out = weight_and_bias(block.attn.out, dtype, torch.float32)
        self.mlp_ln = weight_and_bias(block.mlp_ln, dtype)
        self.fc1, self.fc1_bias = weight_and_bias(block.mlp[0], dtype)  # [4C, C]; the bias added by bias_gelu
        self.fc2 = weight_and_bias(block.mlp[2], dtype, torch.float32)


def split_into_buckets(n: int, buckets: Sequence[int]) -> list[int]:
    """``n`` windows as a list of bucket sizes that sum to ``n`` (largest first; 13 of (1, 2, 4, 8) -> 8, 4, 1).
    ``buckets`` must contain 1 so that every ``n`` is a sum of them."""
    if 1 not in buckets:
        raise ValueError(f"encoder buckets must include 1, got {tuple(buckets)}")
    parts = []
    for bucket in sorted(buckets, reverse=True):
        while n >= bucket:
            parts.append(bucket)
            n -= bucket
    return parts


class EncoderEngine:
    """``engine(mel [n, n_mels, 3000]) -> audio features [n, 1500, C]`` in the engine dtype."""

    def __init__(
        self,
        encoder: AudioEncoder,
        dtype: torch.dtype,
        buckets: Sequence[int],
        device: torch.device,
        cuda_graphs: bool = True,
    ):
        self.dtype, self.device = dtype, torch.device(device)
        self.buckets = tuple(sorted(set(buckets) | {1}))
        self.heads = encoder.blocks[0].attn.n_head
        self.n_mels = encoder.conv1.in_channels
        self.n_frames = 2 * encoder.positional_embedding.shape[0]  # 3000 mel frames -> 1500 positions
        self.eps = encoder.ln_post.eps
        self.conv1 = weight_and_bias(encoder.conv1, dtype)  # [C, n_mels, 3]
        self.conv2 = weight_and_bias(encoder.conv2, dtype)  # [C, C, 3]
        self.positions = encoder.positional_embedding.detach().float().contiguous()  # [1500, C]
        self.blocks = [_Block(b, dtype) for b in encoder.blocks]
        self.ln_post = weight_and_bias(encoder.ln_post, dtype)
        # one graph per bucket, captured on its first use; None: eager
        self.graphs = PaddedGraphs() if cuda_graphs and self.device.type == "cuda" else None

    def forward(self, mel: torch.Tensor) -> torch.Tensor:
        """The encoder, eagerly: mel [n, n_mels, 3000] in the engine dtype -> [n, 1500, C]."""
        dtype = self.dtype
        x = F.gelu(F.conv1d(mel, *self.conv1, padding=1))
        x = F.gelu(F.conv1d(x, *self.conv2, stride=2, padding=1))  # [n, C, 1500]
        x = x.transpose(1, 2).float() + self.positions  # fp32 residual stream [n, 1500, C]
        h = layer_norm(x, *self.blocks[0].attn_ln, eps=self.eps, out_dtype=dtype)
        for i, block in enumerate(self.blocks):
            attention = self.attend(F.linear(h, *block.qkv))  # [n, 1500, C]
            branch = linear_fp32_out(attention, *block.out)  # [n, 1500, C] fp32
            x, h = add_layer_norm(x, branch, *block.mlp_ln, eps=self.eps, out_dtype=dtype)
            f = self.mlp_hidden(h, block)  # [n, 1500, 4C]
            next_ln = self.blocks[i + 1].attn_ln if i + 1 < len(self.blocks) else self.ln_post
            x, h = add_layer_norm(x, linear_fp32_out(f, *block.fc2), *next_ln, eps=self.eps, out_dtype=dtype)
        return h

    def mlp_hidden(self, h: torch.Tensor, block: _Block) -> torch.Tensor:
        """The FFN's hidden activations: exact GELU(h @ W1^T + b1), the bias added in the GELU pass."""
        return bias_gelu(F.linear(h, block.fc1), block.fc1_bias)

    def attend(self, qkv: torch.Tensor) -> torch.Tensor:
        """Bidirectional attention of every head: qkv [n, T, 3C] ([q | k | v] along the features) -> [n, T, C]."""
        q, k, v = (split_heads(t, self.heads) for t in qkv.chunk(3, dim=-1))  # strided [n, H, T, D] views
        return merge_heads(F.scaled_dot_product_attention(q, k, v))

    @torch.inference_mode()
    def __call__(self, mel: torch.Tensor) -> torch.Tensor:
        if mel.dim() != 3 or mel.shape[1:] != (self.n_mels, self.n_frames):
            raise ValueError(
                f"the encoder takes log-mel [n, {self.n_mels}, {self.n_frames}] (30 s windows); got {list(mel.shape)}"
            )
        mel = mel.to(self.device, self.dtype)
        if self.graphs is None or mel.shape[0] == 0:
            return self.forward(mel)
        parts, start = [], 0
        for bucket in split_into_buckets(mel.shape[0], self.buckets):
            out = self.graphs.run(bucket, self.forward, (mel[start : start + bucket],), ((bucket, *mel.shape[1:]),))
            parts.append(out.clone())  # a copy: the graphs share one memory pool, the next replay may reuse it
            start += bucket
        return parts[0] if len(parts) == 1 else torch.cat(parts)
