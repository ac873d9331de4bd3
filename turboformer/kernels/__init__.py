"""Triton kernels of the Whisper GPU engine, one op per file.

Each op file holds its ``@triton.jit`` kernel(s), the launcher ``<op>_triton`` (CUDA tensors, or CPU tensors
under ``TRITON_INTERPRET=1``), the plain PyTorch reference ``<op>_ref`` (fp32 math) and the dispatcher
``<op>``, which runs the launcher on CUDA and the reference everywhere else.

The reference path can be forced everywhere, for A/B checks of a whole model::

    with turboformer.kernels.use_reference():
        logits = model(tokens)

or for a whole process with the environment variable ``TURBOFORMER_KERNELS=reference``. Triton itself is
optional: without it (``triton_available()`` is False) every dispatcher uses the reference.

Import ops from their files (``from turboformer.kernels.layer_norm import add_layer_norm``): this package
re-exports only the switch, so each op's name keeps naming its module.

| file | ops |
| --- | --- |
| ``layer_norm.py`` | ``layer_norm``, ``add_layer_norm`` (residual add + LayerNorm) |
| ``bias_gelu.py`` | ``bias_gelu`` (bias add + exact GELU) |
| ``decode_attention.py`` | ``decode_attention`` (flash-decoding, fp or int8 KV), ``quantize_kv`` |
| ``int8_linear.py`` | ``int8_linear`` (weight-only int8), ``quantize_weight`` |
| ``decode_linear.py`` | ``decode_linear`` (few-row GEMV + LayerNorm prologue, bias/GELU/residual/KV-write epilogue, PDL) |
| ``kv_cache_write.py`` | ``kv_cache_write`` (one step's K and V into a static cache, per-row columns) |
| ``dynamic_conv.py`` | ``dynamic_conv``, ``dynamic_conv_step``, ``dynamic_conv_step_rows`` (beams read inputs by row table) (Lite Transformer) |
| ``norm_linear.py`` | ``norm_linear`` (residual add + LayerNorm prologue, bias/ReLU epilogue, M <= 256 rows; Lite Transformer) |
| ``norm_cross_attention.py`` | ``norm_cross_attention`` (residual add + LayerNorm + query projection + attention over a static K/V; Lite Transformer) |
| ``beam_search_step.py`` | ``beam_search_step`` (fairseq's beam-search step from the logits: candidates + selection/bookkeeping) |
| ``depthwise_conv.py`` | ``depthwise_conv1d`` (+ folded BatchNorm, SiLU; Conformer) |
| ``window_attention.py`` | ``window_attention`` (SAM encoder attention from the fused qkv: windows, padding, rel-pos) |
| ``pos_bias_attention.py`` | ``pos_bias_attention`` (flash attention + Transformer-XL position bias and mask; Conformer) |
| ``channel_layer_norm.py`` | ``channel_layer_norm`` (bias + LayerNorm over NCHW/NHWC channels, optional GELU; SAM upscaler) |
| ``mask_head.py`` | ``mask_head`` (ConvTranspose2d k2 s2 + GELU + hypernetwork product, fp32 logits; SAM upscaler) |
| ``heads_attention.py`` | ``heads_attention`` (flash attention on ``[B, N, heads * D]`` projections, shared side; SAM decoder) |

Every op's tests run under the interpreter in CI and at real shapes on an H200 (``cuda``-marked tests).
"""

from turboformer.kernels.utils import (
    KernelInputError,
    TritonUnavailableError,
    poison_buffers,
    reference_forced,
    triton_available,
    use_reference,
)

__all__ = [
    "KernelInputError",
    "TritonUnavailableError",
    "poison_buffers",
    "reference_forced",
    "triton_available",
    "use_reference",
]
