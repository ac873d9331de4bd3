"""Lite Transformer hyper-parameters, read from a fairseq checkpoint's ``args`` or chosen by name.

The architecture is mit-han-lab/lite-transformer's ``transformer_multibranch_v2`` (Wu et al., ICLR 2020, "Lite
Transformer with Long-Short Range Attention"): every layer's self-attention slot is a *multi-branch* module whose
channels are split between an attention branch (long range) and a convolution branch (short range: dynamic or
lightweight convolution, Wu et al., ICLR 2019). A branch is written ``type:kernel:dim:heads`` in the checkpoint,
e.g. ``attn:1:248:4`` and ``dynamic:default:248:4`` (``default`` = the layer's entry of the kernel-size list).

``LiteTransformerConfig.from_args`` applies upstream's ``base_architecture`` defaults, then rejects every option
this engine does not implement with a ``ConfigError`` that names it.
"""

from __future__ import annotations

from argparse import Namespace
from dataclasses import dataclass, field, replace

PAD = 1  # fairseq Dictionary: <s>=0, <pad>=1, </s>=2, <unk>=3; positions count from PAD + 1

BRANCH_KINDS = ("attn", "dynamic", "lightweight")
ACTIVATIONS = ("relu", "gelu", "gelu_accurate", "gelu_fast", "tanh", "linear")  # fairseq 0.8 get_activation_fn

# upstream's argparse default, truncated to the number of layers by base_architecture
DEFAULT_KERNEL_SIZES = (3, 7, 15, 31, 31, 31, 31)


class ConfigError(ValueError):
    """The checkpoint's architecture options are invalid or not supported by this engine."""


@dataclass(frozen=True)
class BranchSpec:
    """One branch of a multi-branch layer: ``kind:kernel:dim:heads``.

    ``kernel_size`` is None for ``default`` (the layer's entry of the kernel-size list) and is ignored by
    attention branches (whose spec carries a placeholder such as ``1``).
    """

    kind: str  # "attn" | "dynamic" | "lightweight"
    dim: int  # channels of the layer input routed to this branch
    heads: int
    kernel_size: int | None = None

    @classmethod
    def parse(cls, spec: str) -> BranchSpec:
        parts = spec.split(":")
        if len(parts) != 4:
            raise ConfigError(f"branch spec {spec!r}: expected 'type:kernel:dim:heads', e.g. 'dynamic:default:248:4'")
        kind, kernel, dim, heads = parts
        if kind not in BRANCH_KINDS:
            raise ConfigError(
                f"branch spec {spec!r}: unknown branch type {kind!r} (supported: {', '.join(BRANCH_KINDS)})"
            )
        try:
            kernel_size = None if kernel == "default" or kind == "attn" else int(kernel)
            return cls(kind=kind, dim=int(dim), heads=int(heads), kernel_size=kernel_size)
        except ValueError as error:
            raise ConfigError(f"branch spec {spec!r}: kernel, dim and heads must be integers ({error})") from None

    def kernel_for_layer(self, layer_default: int) -> int:
        return layer_default if self.kernel_size is None else self.kernel_size


@dataclass(frozen=True)
class StackConfig:
    """One side (encoder or decoder) of the model."""

    embed_dim: int
    ffn_dim: int
    layers: int
    branches: tuple[BranchSpec, ...]
    kernel_sizes: tuple[int, ...]  # one per layer, used by branches with kernel "default"
    attention_heads: int  # encoder-decoder attention heads (decoder); unused by the encoder's multi-branch layers
    glu: bool = True  # GLU after the dynamic convolution's input projection
    normalize_before: bool = False  # pre-norm (tensor2tensor) instead of post-norm (the paper's default)
    final_norm: bool = False  # LayerNorm after the last layer (pre-norm models)
    learned_pos: bool = False  # learned instead of sinusoidal positions
    max_positions: int = 1024

    def layer_kernels(self, layer: int) -> tuple[int, ...]:
        """Kernel size of each branch of ``layer`` (0 for attention branches)."""
        return tuple(0 if b.kind == "attn" else b.kernel_for_layer(self.kernel_sizes[layer]) for b in self.branches)


@dataclass(frozen=True)
class LiteTransformerConfig:
    src_vocab_size: int
    tgt_vocab_size: int
    encoder: StackConfig
    decoder: StackConfig
    conv_linear: bool = True  # input (linear1) and output (linear2) projections around each convolution
    weight_softmax: bool = True  # softmax-normalise convolution kernels over their taps
    positional_embeddings: bool = True  # False: upstream's --no-token-positional-embeddings
    share_all_embeddings: bool = True  # one table for source, target and output projection
    share_decoder_input_output_embed: bool = True
    activation_fn: str = "relu"
    left_pad_source: bool = True  # batches pad sources on the left (upstream's translation default)
    padding_idx: int = field(default=PAD)

    def __post_init__(self) -> None:
        for name, stack in (("encoder", self.encoder), ("decoder", self.decoder)):
            _validate_stack(name, stack)
        if self.activation_fn not in ACTIVATIONS:
            raise ConfigError(
                f"activation_fn {self.activation_fn!r} not supported (supported: {', '.join(ACTIVATIONS)})"
            )
        if self.share_all_embeddings:
            if self.src_vocab_size != self.tgt_vocab_size:
                raise ConfigError(
                    f"share_all_embeddings needs one joined dictionary, got source size {self.src_vocab_size} "
                    f"and target size {self.tgt_vocab_size}"
                )
            if self.encoder.embed_dim != self.decoder.embed_dim:
                raise ConfigError("share_all_embeddings needs encoder_embed_dim == decoder_embed_dim")
            if not self.share_decoder_input_output_embed:
                raise ConfigError("share_all_embeddings implies share_decoder_input_output_embed")

    @classmethod
    def from_args(cls, args: Namespace, src_vocab_size: int, tgt_vocab_size: int) -> LiteTransformerConfig:
        """Parse a fairseq ``args`` Namespace of a ``transformer_multibranch_v2*`` model."""
        arch = getattr(args, "arch", None)
        if not (isinstance(arch, str) and arch.startswith("transformer_multibranch_v2")):
            raise ConfigError(
                f"arch {arch!r} is not a Lite Transformer (transformer_multibranch_v2*) translation model"
            )
        if arch not in _ARCH_DEFAULTS:
            raise ConfigError(f"arch {arch!r} not supported (supported: {', '.join(sorted(_ARCH_DEFAULTS))})")
        for name, unsupported in (
            ("adaptive_softmax_cutoff", lambda v: v is not None),
            ("adaptive_input", bool),
            ("tie_adaptive_weights", bool),
        ):
            if unsupported(getattr(args, name, None)):
                raise ConfigError(f"{name}={getattr(args, name)!r} is not supported")

        def arg(name: str, default=None):
            return getattr(args, name, _ARCH_DEFAULTS[arch].get(name, default))

        encoder_dim = arg("encoder_embed_dim", 512)
        encoder_ffn = arg("encoder_ffn_embed_dim", 2048)
        no_positions = arg("no_token_positional_embeddings", False)

        def stack(side: str, embed_dim: int, ffn_dim: int, heads_default: int, final_norm: bool) -> StackConfig:
            specs = getattr(args, f"{side}_branch_type", None)
            if not specs:
                raise ConfigError(
                    f"{side}_branch_type is missing: plain transformer layers are not supported, only multi-branch ones"
                )
            layers = arg(f"{side}_layers", 6)
            return StackConfig(
                embed_dim=embed_dim,
                ffn_dim=ffn_dim,
                layers=layers,
                branches=tuple(BranchSpec.parse(s) for s in specs),
                kernel_sizes=_resolve_kernel_sizes(side, getattr(args, f"{side}_kernel_size_list", None), layers),
                attention_heads=arg(f"{side}_attention_heads", heads_default),
                glu=bool(arg(f"{side}_glu", True)),
                normalize_before=bool(arg(f"{side}_normalize_before", False)),
                final_norm=final_norm,
                learned_pos=bool(arg(f"{side}_learned_pos", False)),
                max_positions=getattr(args, f"max_{'source' if side == 'encoder' else 'target'}_positions", 1024),
            )

        decoder_dim = arg("decoder_embed_dim", encoder_dim)
        return cls(
            src_vocab_size=src_vocab_size,
            tgt_vocab_size=tgt_vocab_size,
            encoder=stack("encoder", encoder_dim, encoder_ffn, 8, bool(arg("encoder_normalize_before", False))),
            decoder=stack(
                "decoder",
                decoder_dim,
                arg("decoder_ffn_embed_dim", encoder_ffn),
                8,
                bool(arg("decoder_normalize_before", False)) and not getattr(args, "no_decoder_final_norm", False),
            ),
            conv_linear=bool(getattr(args, "conv_linear", False)),
            weight_softmax=bool(getattr(args, "weight_softmax", True)),
            positional_embeddings=not no_positions,
            share_all_embeddings=bool(arg("share_all_embeddings", False)),
            # build_model forces output sharing when all embeddings are shared
            share_decoder_input_output_embed=bool(
                arg("share_decoder_input_output_embed", False) or arg("share_all_embeddings", False)
            ),
            activation_fn=arg("activation_fn", "relu"),
            left_pad_source=bool(getattr(args, "left_pad_source", True)),
        )

    @classmethod
    def from_name(cls, name: str, vocab_size: int = 32768) -> LiteTransformerConfig:
        """A named size from :data:`NAMED_SIZES` with a joined dictionary of ``vocab_size`` symbols."""
        if name not in NAMED_SIZES:
            raise ConfigError(f"unknown Lite Transformer size {name!r} (known: {', '.join(NAMED_SIZES)})")
        return replace(NAMED_SIZES[name], src_vocab_size=vocab_size, tgt_vocab_size=vocab_size)


def _resolve_kernel_sizes(side: str, sizes, layers: int) -> tuple[int, ...]:
    """upstream base_architecture: one size is repeated, a longer list is truncated, otherwise lengths must match."""
    sizes = tuple(DEFAULT_KERNEL_SIZES if sizes is None else sizes)
    if len(sizes) == 1:
        sizes = sizes * layers
    sizes = sizes[:layers]
    if len(sizes) != layers:
        raise ConfigError(f"{side}_kernel_size_list has {len(sizes)} entries for {layers} layers")
    return sizes


def _validate_stack(side: str, stack: StackConfig) -> None:
    if stack.layers < 1 or stack.embed_dim < 1 or stack.ffn_dim < 1:
        raise ConfigError(f"{side}: layers, embed_dim and ffn_dim must be positive")
    dims = sum(b.dim for b in stack.branches)
    if dims != stack.embed_dim:
        raise ConfigError(f"{side}: branch dims {[b.dim for b in stack.branches]} sum to {dims}, not {stack.embed_dim}")
    for branch in stack.branches:
        if branch.heads < 1 or branch.dim % branch.heads:
            raise ConfigError(
                f"{side}: branch {branch.kind} dim {branch.dim} is not divisible by its {branch.heads} heads"
            )
    for layer in range(stack.layers):
        for branch, kernel in zip(stack.branches, stack.layer_kernels(layer)):
            if branch.kind == "attn":
                continue
            if kernel < 1:
                raise ConfigError(f"{side} layer {layer}: {branch.kind} kernel size {kernel} must be positive")
            if side == "encoder" and kernel % 2 == 0:
                # upstream pads even encoder kernels with a (left, right) tuple that its convolution modules reject
                raise ConfigError(
                    f"encoder layer {layer}: even kernel size {kernel} is not supported (centred padding)"
                )
    if side == "decoder" and stack.embed_dim % stack.attention_heads:
        raise ConfigError(
            f"decoder_embed_dim {stack.embed_dim} is not divisible by {stack.attention_heads} attention heads"
        )


# Per-architecture defaults of upstream's register_model_architecture functions (only those that differ from
# base_architecture; values present in args always win).
_ARCH_DEFAULTS: dict[str, dict] = {
    "transformer_multibranch_v2": {},
    "transformer_multibranch_v2_wmt_en_de": {},
    "transformer_multibranch_v2_iwslt_de_en": {
        "encoder_ffn_embed_dim": 1024,
        "encoder_attention_heads": 4,
        "decoder_ffn_embed_dim": 1024,
        "decoder_attention_heads": 4,
    },
}


def _wmt(embed_dim: int) -> LiteTransformerConfig:
    """The repo's WMT'14 En-Fr / WMT'16 En-De configs (configs/wmt*/attention/multibranch_v2/embed{D}.yml):
    arch transformer_multibranch_v2_wmt_en_de (6 + 6 layers, 8 encoder-decoder heads, kernels 3, 7, 15, 31, 31, 31),
    ffn dim = embed dim, half the channels to a 4-head attention branch, half to a 4-head dynamic convolution with
    GLU, post-norm, sinusoidal positions, all embeddings shared."""
    branches = (BranchSpec("attn", embed_dim // 2, 4), BranchSpec("dynamic", embed_dim // 2, 4))

    def side() -> StackConfig:
        return StackConfig(embed_dim, embed_dim, 6, branches, DEFAULT_KERNEL_SIZES[:6], 8)

    return LiteTransformerConfig(src_vocab_size=32768, tgt_vocab_size=32768, encoder=side(), decoder=side())


# The vocabulary size of the WMT models depends on their BPE dictionary; 32768 (a 32k joined BPE vocabulary
# padded to a multiple of 8) is an assumption, pass vocab_size to from_name for a real dictionary.
NAMED_SIZES: dict[str, LiteTransformerConfig] = {
    "wmt-en-de": _wmt(496),  # the paper's largest mobile setting (~500M Mult-Adds at 30 tokens)
    "wmt-en-de-408": _wmt(408),
    "wmt-en-de-200": _wmt(200),
}
