"""LinMU: Multimodal Understanding Made Linear (arXiv 2601.01322), a pure-PyTorch reference.

Read this file top to bottom next to the paper:

  1. the chunked SSD scan (the Mamba2 state-space-duality algorithm), linear in length;
  2. Flex-MA, the bidirectional Mamba2-style global branch;
  3. Local-Swin, shifted-window attention for neighbouring tokens;
  4. M-MATE, the two branches fused by a per-token gate, initialized from attention;
  5. LoRA adapters for the last distillation stage;
  6. the vision-language model (SmolVLM2: SigLIP, pixel-shuffle connector, Llama decoder),
     whose decoder self-attention layers M-MATE replaces.

Shapes are written (B, L, H, P) style: batch, length, heads, head dim; N is the SSM state size,
G the number of B/C groups, D the model width.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


@dataclass
class MixerConfig:
    """M-MATE settings. The paper fixes the two-branch design; these sizes are our documented defaults.

    chunk_size: SSD chunk length (Flex-MA); conv_kernel: Flex-MA's short causal convolution;
    window_frames/rows/cols: Local-Swin's 3D window over visual grids (2D for an image: frames=1);
    text_window: how many previous tokens (any modality, itself included) a text token attends to;
    branches: "both" (M-MATE), or one branch alone: "flex" (stage 1, ablation) or "swin" (ablation).
    """

    chunk_size: int = 64
    conv_kernel: int = 4
    window_frames: int = 2
    window_rows: int = 4
    window_cols: int = 4
    text_window: int = 128
    branches: str = "both"


# ----------------------------------------------------------------------------------------------
# Building blocks shared by the teacher and the student


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Llama's), computed in float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(x.dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (Llama's rotate-half form). x: (B, L, H, Dh); cos, sin: (B, L, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@dataclass
class TokenLayout:
    """Where each token of a (B, L) multimodal sequence sits.

    positions: (B, L) absolute positions (for RoPE);
    visual:    (B, L) True for image/video tokens;
    cells:     (B, L, 4) (grid, frame, row, col) of each visual token, -1 for text;
    grid_shapes: per batch element, the (frames, rows, cols) of each visual grid in order.
    An image tile is a (1, rows, cols) grid, a video a (frames, rows, cols) grid.
    """

    positions: Tensor
    visual: Tensor
    cells: Tensor
    grid_shapes: list[list[tuple[int, int, int]]]

    @classmethod
    def text(cls, batch: int, length: int, start: int = 0, device=None) -> TokenLayout:
        """A text-only layout: positions start, ..., start + length - 1 (used while decoding)."""
        positions = torch.arange(start, start + length, device=device).expand(batch, length)
        visual = torch.zeros(batch, length, dtype=torch.bool, device=device)
        cells = torch.full((batch, length, 4), -1, dtype=torch.long, device=device)
        return cls(positions, visual, cells, [[] for _ in range(batch)])

    @classmethod
    def build(cls, input_ids: Tensor, image_token_id: int,
              grids: list[list[tuple[int, int, int]]] | None, start: int = 0) -> TokenLayout:
        """Lay out a prompt: the image tokens of row b fill grids[b] in order, each frame row-major."""
        batch, length = input_ids.shape
        layout = cls.text(batch, length, start, input_ids.device)
        layout.visual = input_ids == image_token_id
        layout.grid_shapes = [list(map(tuple, g)) for g in grids] if grids is not None else [[] for _ in range(batch)]
        if len(layout.grid_shapes) != batch:
            raise ValueError(f"grids has {len(layout.grid_shapes)} entries for a batch of {batch}: give one list of "
                             "(frames, rows, cols) per sequence")
        cells = layout.cells.clone()
        for b, shapes in enumerate(layout.grid_shapes):
            where = layout.visual[b].nonzero().squeeze(1)
            sizes = [f * r * c for f, r, c in shapes]
            if sum(sizes) != len(where):
                raise ValueError(f"sequence {b} has {len(where)} image tokens but its grids {shapes} hold "
                                 f"{sum(sizes)}: pass the grids the processor returned with these input_ids")
            for g, ((f, r, c), idx) in enumerate(zip(shapes, where.split(sizes))):
                t, y, x = torch.meshgrid(*(torch.arange(n, device=input_ids.device) for n in (f, r, c)), indexing="ij")
                cells[b, idx] = torch.stack([torch.full_like(t, g), t, y, x], -1).reshape(-1, 4)
        layout.cells = cells
        return layout
