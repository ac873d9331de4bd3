"""Load official Segment Anything checkpoints (``sam_vit_{b,l,h}_*.pth``, upstream state dicts).

The model size is read from the tensor shapes (embedding width, block count, rel-pos table lengths),
so the same loader also reads custom-sized checkpoints saved by upstream ``segment_anything``. Names are
converted by one explicit map from our parameter names to upstream ones; two of our tensors stack
several upstream ones (the point-kind embeddings and the decoder's output tokens).

Upstream sizes that shapes cannot show are SAM's fixed values: 8 decoder heads, window attention
of ``2 * window - 1`` rel-pos rows, patch embedding with bias.
"""

import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path

import torch

from .config import SamConfig, config_name
from .engine import prepare_sam
from .errors import SamCheckpointError, first_line
from .sam import Sam, build_sam

# Our name -> upstream name, or a tuple of upstream names whose tensors are concatenated on dim 0.
# "{i}" is an encoder block, "{l}" a two-way transformer layer, "{m}" a mask token, "{j}" an MLP layer.
ENCODER_MAP = {
    "image_encoder.patch_embed.weight": "image_encoder.patch_embed.proj.weight",
    "image_encoder.patch_embed.bias": "image_encoder.patch_embed.proj.bias",
    "image_encoder.pos_embed": "image_encoder.pos_embed",
    "image_encoder.neck.conv1.weight": "image_encoder.neck.0.weight",
    "image_encoder.neck.norm1.weight": "image_encoder.neck.1.weight",
    "image_encoder.neck.norm1.bias": "image_encoder.neck.1.bias",
    "image_encoder.neck.conv2.weight": "image_encoder.neck.2.weight",
    "image_encoder.neck.norm2.weight": "image_encoder.neck.3.weight",
    "image_encoder.neck.norm2.bias": "image_encoder.neck.3.bias",
}
ENCODER_BLOCK_MAP = {
    "image_encoder.blocks.{i}.norm1.weight": "image_encoder.blocks.{i}.norm1.weight",
    "image_encoder.blocks.{i}.norm1.bias": "image_encoder.blocks.{i}.norm1.bias",
    "image_encoder.blocks.{i}.attn.qkv.weight": "image_encoder.blocks.{i}.attn.qkv.weight",
    "image_encoder.blocks.{i}.attn.qkv.bias": "image_encoder.blocks.{i}.attn.qkv.bias",
    "image_encoder.blocks.{i}.attn.proj.weight": "image_encoder.blocks.{i}.attn.proj.weight",
    "image_encoder.blocks.{i}.attn.proj.bias": "image_encoder.blocks.{i}.attn.proj.bias",
    "image_encoder.blocks.{i}.attn.rel_pos_h": "image_encoder.blocks.{i}.attn.rel_pos_h",
    "image_encoder.blocks.{i}.attn.rel_pos_w": "image_encoder.blocks.{i}.attn.rel_pos_w",
    "image_encoder.blocks.{i}.norm2.weight": "image_encoder.blocks.{i}.norm2.weight",
    "image_encoder.blocks.{i}.norm2.bias": "image_encoder.blocks.{i}.norm2.bias",
    "image_encoder.blocks.{i}.mlp.fc1.weight": "image_encoder.blocks.{i}.mlp.lin1.weight",
    "image_encoder.blocks.{i}.mlp.fc1.bias": "image_encoder.blocks.{i}.mlp.lin1.bias",
    "image_encoder.blocks.{i}.mlp.fc2.weight": "image_encoder.blocks.{i}.mlp.lin2.weight",
    "image_encoder.blocks.{i}.mlp.fc2.bias": "image_encoder.blocks.{i}.mlp.lin2.bias",
}
PROMPT_ENCODER_MAP = {
    "prompt_encoder.pe.gaussian": "prompt_encoder.pe_layer.positional_encoding_gaussian_matrix",
    "prompt_encoder.label_embed": (  # rows in label order -1, 0, 1, box top-left, box bottom-right
        "prompt_encoder.not_a_point_embed.weight",
        "prompt_encoder.point_embeddings.0.weight",
        "prompt_encoder.point_embeddings.1.weight",
        "prompt_encoder.point_embeddings.2.weight",
        "prompt_encoder.point_embeddings.3.weight",
    ),
    "prompt_encoder.no_mask_embed": "prompt_encoder.no_mask_embed.weight",
    "prompt_encoder.mask_downscale.conv1.weight": "prompt_encoder.mask_downscaling.0.weight",
    "prompt_encoder.mask_downscale.conv1.bias": "prompt_encoder.mask_downscaling.0.bias",
    "prompt_encoder.mask_downscale.norm1.weight": "prompt_encoder.mask_downscaling.1.weight",
    "prompt_encoder.mask_downscale.norm1.bias": "prompt_encoder.mask_downscaling.1.bias",
    "prompt_encoder.mask_downscale.conv2.weight": "prompt_encoder.mask_downscaling.3.weight",
    "prompt_encoder.mask_downscale.conv2.bias": "prompt_encoder.mask_downscaling.3.bias",
    "prompt_encoder.mask_downscale.norm2.weight": "prompt_encoder.mask_downscaling.4.weight",
    "prompt_encoder.mask_downscale.norm2.bias": "prompt_encoder.mask_downscaling.4.bias",
    "prompt_encoder.mask_downscale.conv3.weight": "prompt_encoder.mask_downscaling.6.weight",
    "prompt_encoder.mask_downscale.conv3.bias": "prompt_encoder.mask_downscaling.6.bias",
}
DECODER_MAP = {
    "mask_decoder.output_tokens": ("mask_decoder.iou_token.weight", "mask_decoder.mask_tokens.weight"),
    "mask_decoder.upscale.conv1.weight": "mask_decoder.output_upscaling.0.weight",
    "mask_decoder.upscale.conv1.bias": "mask_decoder.output_upscaling.0.bias",
    "mask_decoder.upscale.norm.weight": "mask_decoder.output_upscaling.1.weight",
    "mask_decoder.upscale.norm.bias": "mask_decoder.output_upscaling.1.bias",
    "mask_decoder.upscale.conv2.weight": "mask_decoder.output_upscaling.3.weight",
    "mask_decoder.upscale.conv2.bias": "mask_decoder.output_upscaling.3.bias",
    "mask_decoder.transformer.norm_final_attn.weight": "mask_decoder.transformer.norm_final_attn.weight",
    "mask_decoder.transformer.norm_final_attn.bias": "mask_decoder.transformer.norm_final_attn.bias",
}
DECODER_ATTENTIONS = ("self_attn", "cross_attn_token_to_image", "cross_attn_image_to_token")
DECODER_LAYER_MAP = {
    **{
        f"mask_decoder.transformer.layers.{{l}}.{attn}.{proj}.{p}": (
            f"mask_decoder.transformer.layers.{{l}}.{attn}.{proj}.{p}"
        )
        for attn in DECODER_ATTENTIONS
        for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
        for p in ("weight", "bias")
    },
    **{
        f"mask_decoder.transformer.layers.{{l}}.norm{n}.{p}": f"mask_decoder.transformer.layers.{{l}}.norm{n}.{p}"
        for n in (1, 2, 3, 4)
        for p in ("weight", "bias")
    },
    "mask_decoder.transformer.layers.{l}.mlp.fc1.weight": "mask_decoder.transformer.layers.{l}.mlp.lin1.weight",
    "mask_decoder.transformer.layers.{l}.mlp.fc1.bias": "mask_decoder.transformer.layers.{l}.mlp.lin1.bias",
    "mask_decoder.transformer.layers.{l}.mlp.fc2.weight": "mask_decoder.transformer.layers.{l}.mlp.lin2.weight",
    "mask_decoder.transformer.layers.{l}.mlp.fc2.bias": "mask_decoder.transformer.layers.{l}.mlp.lin2.bias",
}
DECODER_FINAL_ATTN_MAP = {
    f"mask_decoder.transformer.final_attn_token_to_image.{proj}.{p}": (
        f"mask_decoder.transformer.final_attn_token_to_image.{proj}.{p}"
    )
    for proj in ("q_proj", "k_proj", "v_proj", "out_proj")
    for p in ("weight", "bias")
}
HYPERNET_MAP = {
    "mask_decoder.hypernet_mlps.{m}.layers.{j}.weight": "mask_decoder.output_hypernetworks_mlps.{m}.layers.{j}.weight",
    "mask_decoder.hypernet_mlps.{m}.layers.{j}.bias": "mask_decoder.output_hypernetworks_mlps.{m}.layers.{j}.bias",
}
IOU_HEAD_MAP = {
    "mask_decoder.iou_head.layers.{j}.weight": "mask_decoder.iou_prediction_head.layers.{j}.weight",
    "mask_decoder.iou_head.layers.{j}.bias": "mask_decoder.iou_prediction_head.layers.{j}.bias",
}
HYPERNET_DEPTH = 3  # layers of each mask token's MLP (fixed in SAM)


def weight_map(config: SamConfig) -> dict[str, str | tuple[str, ...]]:
    """The full name map for a model of size ``config``: our name -> upstream name(s)."""
    names: dict[str, str | tuple[str, ...]] = {
        **ENCODER_MAP, **PROMPT_ENCODER_MAP, **DECODER_MAP, **DECODER_FINAL_ATTN_MAP
    }
    for i in range(config.encoder_depth):
        names.update({ours.format(i=i): theirs.format(i=i) for ours, theirs in ENCODER_BLOCK_MAP.items()})
    for layer in range(config.decoder_depth):
        names.update({ours.format(l=layer): theirs.format(l=layer) for ours, theirs in DECODER_LAYER_MAP.items()})
    for m in range(config.num_multimask_outputs + 1):
        for j in range(HYPERNET_DEPTH):
            names.update({ours.format(m=m, j=j): theirs.format(m=m, j=j) for ours, theirs in HYPERNET_MAP.items()})
    for j in range(config.iou_head_depth):
        names.update({ours.format(j=j): theirs.format(j=j) for ours, theirs in IOU_HEAD_MAP.items()})
    return names


def _count(state_dict: Mapping[str, torch.Tensor], template: str) -> int:
    """How many consecutive indices ``n = 0, 1, ...`` have ``template.format(n=n)`` in the state dict."""
    n = 0
    while template.format(n=n) in state_dict:
        n += 1
    return n


def detect_config(state_dict: Mapping[str, torch.Tensor]) -> SamConfig:
    """Read a :class:`SamConfig` from the tensor shapes of an upstream SAM state dict."""
    try:
        patch = state_dict["image_encoder.patch_embed.proj.weight"]  # [E, 3, P, P]
        pos = state_dict["image_encoder.pos_embed"]  # [1, G, G, E]
        depth = _count(state_dict, "image_encoder.blocks.{n}.norm1.weight")
        rel_rows = [state_dict[f"image_encoder.blocks.{i}.attn.rel_pos_h"].shape for i in range(depth)]
        mlp = state_dict["image_encoder.blocks.0.mlp.lin1.weight"]  # [M, E]
        neck = state_dict["image_encoder.neck.0.weight"]  # [C, E, 1, 1]
        mask_chans = state_dict["prompt_encoder.mask_downscaling.3.weight"].shape[0]
        mask_tokens = state_dict["mask_decoder.mask_tokens.weight"].shape[0]
        decoder_depth = _count(state_dict, "mask_decoder.transformer.layers.{n}.norm1.weight")
        decoder_mlp = state_dict["mask_decoder.transformer.layers.0.mlp.lin1.weight"].shape[0]
        cross_q = state_dict["mask_decoder.transformer.final_attn_token_to_image.q_proj.weight"]  # [C / r, C]
        iou_depth = _count(state_dict, "mask_decoder.iou_prediction_head.layers.{n}.weight")
        iou_hidden = state_dict["mask_decoder.iou_prediction_head.layers.0.weight"].shape[0]
    except KeyError as missing:
        raise SamCheckpointError(
            f"not an official Segment Anything checkpoint: tensor {missing} is missing"
        ) from None
    embed_dim, grid = patch.shape[0], pos.shape[1]
    if depth == 0:
        raise SamCheckpointError("not an official Segment Anything checkpoint: no image encoder blocks")
    windows = {(rows[0] + 1) // 2 for rows in rel_rows if rows[0] != 2 * grid - 1}
    if len(windows) > 1:
        raise SamCheckpointError(f"encoder blocks have different window sizes {sorted(windows)}")
    head_dim = rel_rows[0][1]
    try:
        return SamConfig(
            image_size=grid * patch.shape[-1],
            patch_size=patch.shape[-1],
            encoder_embed_dim=embed_dim,
            encoder_depth=depth,
            encoder_num_heads=embed_dim // head_dim,
            encoder_mlp_dim=mlp.shape[0],
            encoder_global_attn_indexes=tuple(i for i, rows in enumerate(rel_rows) if rows[0] == 2 * grid - 1),
            encoder_window_size=windows.pop() if windows else SamConfig.encoder_window_size,
            prompt_embed_dim=neck.shape[0],
            mask_in_chans=mask_chans,
            decoder_depth=decoder_depth,
            decoder_mlp_dim=decoder_mlp,
            attention_downsample_rate=cross_q.shape[1] // cross_q.shape[0],
            num_multimask_outputs=mask_tokens - 1,
            iou_head_depth=iou_depth,
            iou_head_hidden_dim=iou_hidden,
        )
    except ValueError as err:
        raise SamCheckpointError(f"checkpoint shapes do not describe a valid SAM: {err}") from None


def convert_state_dict(state_dict: Mapping[str, torch.Tensor], config: SamConfig) -> dict[str, torch.Tensor]:
    """Rename (and stack) an upstream state dict into ours; every upstream tensor must be used once."""
    converted, used = {}, set()
    for ours, theirs in weight_map(config).items():
        sources = theirs if isinstance(theirs, tuple) else (theirs,)
        missing = [name for name in sources if name not in state_dict]
        if missing:
            raise SamCheckpointError(f"checkpoint is missing {missing[0]!r} (needed for {ours!r})")
        tensors = [state_dict[name] for name in sources]
        if len({t.shape[1:] for t in tensors}) > 1:
            raise SamCheckpointError(f"tensors {list(sources)} (stacked into {ours!r}) have mismatched widths")
        converted[ours] = torch.cat(tensors, dim=0) if isinstance(theirs, tuple) else tensors[0]
        used.update(sources)
    unexpected = sorted(set(state_dict) - used)
    if unexpected:
        more = f" and {len(unexpected) - 3} more" if len(unexpected) > 3 else ""
        raise SamCheckpointError(f"checkpoint has unexpected tensors {unexpected[:3]}{more}")
    return converted


def read_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.pth`` state dict on the CPU, with only tensors allowed (``weights_only``)."""
    path = Path(path)
    if not path.is_file():
        raise SamCheckpointError(f"checkpoint not found: {path}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, RuntimeError, EOFError, OSError) as err:
        raise SamCheckpointError(f"{path} is not a PyTorch checkpoint ({first_line(err)})") from None
    _check_tensors(state_dict, str(path))
    return dict(state_dict)


def _check_tensors(state_dict: object, source: str) -> None:
    """Raise unless ``state_dict`` maps names to tensors."""
    if not isinstance(state_dict, Mapping) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise SamCheckpointError(f"{source} does not hold a state dict of tensors (an official sam_vit_*.pth does)")


def load_sam(
    checkpoint: str | Path | Mapping[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    decoder_dtype: torch.dtype | None = None,
) -> Sam:
    """Build a :class:`Sam` of the size found in ``checkpoint`` (a path or an upstream state dict), on
    ``device`` in ``dtype`` (float32, float16 or bfloat16); ``quantize="int8"`` makes the image encoder's
    linear layers weight-only INT8; ``decoder_dtype`` is the prompt encoder's and mask decoder's (default
    ``dtype``, but float16 for a bfloat16 model; see :func:`.engine.prepare_sam`).

    The model takes over the checkpoint's tensors where no copy is needed (``assign=True``), so a
    state dict passed in shares storage with the returned model.

    Raises:
        SamCheckpointError: the file is missing, unreadable, or not a SAM checkpoint.
    """
    if isinstance(checkpoint, Mapping):
        _check_tensors(checkpoint, "the state dict given")
        state_dict = checkpoint
    else:
        state_dict = read_checkpoint(checkpoint)
    config = detect_config(state_dict)
    converted = convert_state_dict(state_dict, config)
    with torch.device("meta"):
        model = build_sam(config)
    expected = model.state_dict()
    for name, tensor in converted.items():
        if tensor.shape != expected[name].shape:
            raise SamCheckpointError(
                f"tensor {name!r} has shape {list(tensor.shape)}, expected {list(expected[name].shape)} "
                f"for a {config_name(config) or 'custom'} SAM"
            )
    model.load_state_dict(converted, assign=True)
    return prepare_sam(model, device, dtype, quantize, decoder_dtype)

