"""SAM's GPU engine: the model placed in its dtype (optionally INT8), and the prompt path as CUDA graphs.

Two pieces:

* :func:`prepare_sam` moves a :class:`Sam` to its device and dtype (fp32, fp16 or bf16; a bf16 model
  decodes prompts in fp16, see :func:`default_decoder_dtype`), keeping the random-Fourier position matrix
  in fp32, and optionally swaps the image encoder's linear layers for
  weight-only INT8 (:func:`turboformer.nn.linear.quantize_linears`: qkv, proj, fc1, fc2 of every block,
  98% of the encoder's weights). Inside the fp16/bf16 model, LayerNorms take fp32 statistics
  (``nn.LayerNorm``; ``LayerNorm2d`` upcasts; the encoder's residual + LayerNorm is the fused Triton
  ``add_layer_norm``), softmax is fp32 inside the fused attentions (the rel-pos flash attention in the
  encoder, torch SDPA in the decoder).
* :class:`PromptDecoderEngine` runs prompt encoder + mask decoder for a batch of prompts on one image
  embedding. A batch is padded to the next declared bucket (1, 2, 4, ..., 64) and runs on static buffers;
  on CUDA each (prompt layout, bucket) is one CUDA graph, captured the first time its layout is seen. At 64
  prompts the decoder is ~100 small kernels whose launches, not their maths, dominate eager time.

A *prompt layout* is what changes the decoder's tensor shapes: the number of points per prompt (0 for
none; upstream appends one padding point when there is no box), whether a box is given, whether a mask
input is given. ``multimask_output`` does not: all four masks are computed and selected afterwards.
Layouts with more than ``MAX_GRAPHED_POINTS`` points, or beyond ``MAX_GRAPHED_LAYOUTS`` distinct ones
(each holds its own graph memory pool), run eagerly.

Every prompt row is computed independently of the others (per-row attention, LayerNorm and matmuls), so
padding rows (whatever stale, finite values the static buffers hold) cannot change the real rows.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from turboformer.nn.linear import quantize_linears
from turboformer.runtime.cuda_graphs import DEFAULT_BUCKETS, GraphedStep, bucket_for

from .sam import Sam

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
QUANTIZE = (None, "int8")
MAX_GRAPHED_POINTS = 16  # points per prompt with a captured graph; more run eagerly
MAX_GRAPHED_LAYOUTS = 8  # distinct layouts captured per engine (each keeps a memory pool of its own)


def default_decoder_dtype(dtype: torch.dtype) -> torch.dtype:
    """The prompt encoder's and mask decoder's dtype for a model in ``dtype``: the same, except float16 for
    a bfloat16 model.

    Why: the decoder's mask logits come out of long cancelling sums (with random weights their spread is
    ~5% of the activations'), so bf16's 8-bit mantissa moves pixels across the 0 threshold (box-prompt
    mask IoU 0.977 against fp32 on the test photos with a bf16 decoder, 0.998 with fp16). fp16 is safe
    there: the decoder is post-norm, every activation comes out of a LayerNorm within a few units. The
    encoder keeps bf16, whose range covers the large activations of deep pre-norm ViTs.
    """
    return torch.float16 if dtype == torch.bfloat16 else dtype


def prepare_sam(
    model: Sam,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    quantize: str | None = None,
    decoder_dtype: torch.dtype | None = None,
) -> Sam:
    """Place ``model`` (in place) on ``device``: the image encoder in ``dtype``, the prompt encoder and mask
    decoder in ``decoder_dtype`` (default :func:`default_decoder_dtype`); ``quantize="int8"`` makes the
    image encoder's linear layers weight-only INT8 (quantised from the fp32 weights, per output channel).
    Returns it.

    INT8 runs the Triton kernel on CUDA and a dequantising PyTorch reference on the CPU (for tests).
    """
    decoder_dtype = default_decoder_dtype(dtype) if decoder_dtype is None else decoder_dtype
    for d in (dtype, decoder_dtype):
        if d not in DTYPES:
            raise ValueError(f"dtype must be one of {[str(d) for d in DTYPES]}, got {d}")
    if quantize not in QUANTIZE:
        raise ValueError(f"quantize must be None or 'int8', got {quantize!r}")
    gaussian = model.prompt_encoder.pe.gaussian.detach().float()
    model = model.to(device=device)
    if quantize == "int8":
        quantize_linears(model.image_encoder)  # from the fp32 weights; the int8 buffers ignore .to(dtype)
    model.image_encoder.to(dtype=dtype)
    model.prompt_encoder.to(dtype=decoder_dtype)
    model.mask_decoder.to(dtype=decoder_dtype)
    # sin/cos arguments reach tens of radians: the position matrix stays fp32 (see RandomFourierPositions)
    model.prompt_encoder.pe.gaussian = gaussian.to(model.prompt_encoder.label_embed.device)
    return model.eval()


@dataclass(frozen=True)
class PromptLayout:
    """The shape-changing part of a prompt batch: points per prompt, a box or not, a mask input or not."""

    num_points: int
    box: bool
    mask: bool


class PromptDecoderEngine:
    """Prompt encoder + mask decoder over static, bucket-padded buffers; CUDA graphs per layout and bucket.

    ``decode`` returns all four masks' low-resolution logits ``[B, 4, 256, 256]`` and IoU predictions
    ``[B, 4]`` (float32, fresh tensors); batches above the largest bucket run in chunks.
    ``cuda_graphs=False`` runs the very same step on the same buffers eagerly (the CPU tests' path);
    the default is graphs exactly when the model is on CUDA.
    """

    def __init__(self, model: Sam, buckets: tuple[int, ...] = DEFAULT_BUCKETS, cuda_graphs: bool | None = None):
        if not buckets or min(buckets) < 1:
            raise ValueError(f"buckets must be positive prompt batch sizes, got {buckets}")
        on_cuda = model.device.type == "cuda"
        self.cuda_graphs = on_cuda if cuda_graphs is None else cuda_graphs
        if self.cuda_graphs and not on_cuda:
            raise ValueError("CUDA graphs need the model on a CUDA device")
        self.model = model
        self.buckets = tuple(sorted(set(buckets)))
        self.max_batch = self.buckets[-1]
        cfg, device, dtype = model.config, model.device, model.dtype
        grid, low, masks = cfg.image_embedding_size, cfg.low_res_mask_size, cfg.num_multimask_outputs + 1
        with torch.no_grad():
            self.image_pe = model.prompt_encoder.dense_pe()  # [1, C, 64, 64], fixed by the weights
        # Static inputs (largest bucket). Coordinates are float64: an fp32 input converts exactly, and the
        # prompt encoder normalises in its input's precision (float64 from the automatic generator).
        self.embedding = torch.zeros(1, cfg.prompt_embed_dim, grid, grid, device=device, dtype=dtype)
        self.boxes = torch.zeros(self.max_batch, 4, device=device, dtype=torch.float64)
        self.mask_input = torch.zeros(self.max_batch, 1, low, low, device=device, dtype=dtype)
        self.points: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # per points per prompt
        # Static outputs
        self.low_res = torch.zeros(self.max_batch, masks, low, low, device=device, dtype=torch.float32)
        self.iou = torch.zeros(self.max_batch, masks, device=device, dtype=torch.float32)
        self.steps: dict[PromptLayout, GraphedStep] = {}

    @staticmethod
    def layout_of(coords: torch.Tensor | None, boxes: torch.Tensor | None, mask_input: torch.Tensor | None):
        return PromptLayout(0 if coords is None else coords.shape[1], boxes is not None, mask_input is not None)

    def graphed(self, layout: PromptLayout) -> bool:
        """Whether ``layout`` runs on the static buffers (captured as graphs on CUDA) rather than eagerly."""
        if layout in self.steps:
            return True
        return layout.num_points <= MAX_GRAPHED_POINTS and len(self.steps) < MAX_GRAPHED_LAYOUTS

    @torch.no_grad()
    def decode(
        self,
        embedding: torch.Tensor,
        coords: torch.Tensor | None,
        labels: torch.Tensor | None,
        boxes: torch.Tensor | None,
        mask_input: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All masks for ``B`` prompts on one image (shapes validated by the caller).

        Args:
            embedding: ``[1, C, 64, 64]`` image embedding.
            coords: ``[B, N, 2]`` pixel (x, y) in the model's 1024 frame, labels ``[B, N]``; or None.
            boxes: ``[B, 4]`` (x0, y0, x1, y1) in that frame, or None.
            mask_input: ``[B, 1, 256, 256]`` logits, or None.

        Returns:
            logits ``[B, 4, 256, 256]`` and IoU predictions ``[B, 4]``.
        """
        layout = self.layout_of(coords, boxes, mask_input)
        if not self.graphed(layout):
            return self._eager(embedding, coords, labels, boxes, mask_input)
        step = self._step(layout)
        self.embedding.copy_(embedding)
        batch = next(x.shape[0] for x in (coords, boxes, mask_input) if x is not None)
        logits, iou = [], []
        for start in range(0, batch, self.max_batch):
            rows = min(self.max_batch, batch - start)
            if coords is not None:
                static_coords, static_labels = self.points[layout.num_points]
                static_coords[:rows].copy_(coords[start : start + rows])
                static_labels[:rows].copy_(labels[start : start + rows])
            if boxes is not None:
                self.boxes[:rows].copy_(boxes[start : start + rows])
            if mask_input is not None:
                self.mask_input[:rows].copy_(mask_input[start : start + rows])
            step.run(bucket_for(rows, self.buckets))
            logits.append(self.low_res[:rows].clone())  # the next replay overwrites the static outputs
            iou.append(self.iou[:rows].clone())
        if len(logits) == 1:
            return logits[0], iou[0]
        return torch.cat(logits), torch.cat(iou)

    def _eager(self, embedding, coords, labels, boxes, mask_input) -> tuple[torch.Tensor, torch.Tensor]:
        """The unpadded eager path, for layouts without a graph."""
        sparse, dense = self.model.prompt_encoder(coords, labels, boxes, mask_input)
        return self.model.mask_decoder.predict_all(embedding, self.image_pe, sparse, dense)

    def _step(self, layout: PromptLayout) -> GraphedStep:
        """The (captured) step of ``layout``, built on first use."""
        if layout in self.steps:
            return self.steps[layout]
        n = layout.num_points
        if n and n not in self.points:
            device = self.embedding.device
            self.points[n] = (
                torch.zeros(self.max_batch, n, 2, device=device, dtype=torch.float64),
                torch.ones(self.max_batch, n, device=device, dtype=torch.int32),
            )
        prompt_encoder, mask_decoder = self.model.prompt_encoder, self.model.mask_decoder

        @torch.no_grad()
        def step(bucket: int) -> None:
            # Reads the static inputs' first `bucket` rows, writes the static outputs' (no host syncs).
            coords, labels = (t[:bucket] for t in self.points[n]) if n else (None, None)
            boxes = self.boxes[:bucket] if layout.box else None
            mask_input = self.mask_input[:bucket] if layout.mask else None
            sparse, dense = prompt_encoder(coords, labels, boxes, mask_input)
            logits, iou = mask_decoder.predict_all(self.embedding, self.image_pe, sparse, dense)
            self.low_res[:bucket].copy_(logits)
            self.iou[:bucket].copy_(iou)

        self.steps[layout] = GraphedStep(step, self.buckets, enabled=self.cuda_graphs)
        return self.steps[layout]
