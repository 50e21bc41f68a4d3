"""LinMU: Multimodal Understanding Made Linear (arXiv 2601.01322), a pure-PyTorch reference.

Read this file top to bottom next to the paper:

  1. the chunked SSD scan (the Mamba2 state-space-duality algorithm), linear in length;
  2. Flex-MA, the bidirectional Mamba2-style global branch;
  3. Local-Swin, shifted-window attention for neighbouring tokens;
  4. M-MATE, the two branches fused by a per-token gate, initialized from attention;
  5. LoRA adapters for the last distillation stage;
  6. the vision-language model (SmolVLM2: SigLIP, pixel-shuffle connector, Llama decoder),
     whose decoder self-attention layers M-MATE replaces; generation with fixed-size decoding state.

Shapes are written (B, L, H, P) style: batch, length, heads, head dim; N is the SSM state size,
G the number of B/C groups, D the model width.

One implementation serves the CPU and the GPU. Everything that depends on a prompt's content
(where its visual tokens are, Local-Swin's windows) is worked out once per prompt, before the
decoder layers (PromptPlan), so that a layer runs a fixed number of torch operations whatever the
prompt's length, never waits on the host, and compiles into one graph for every length.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import shutil
import sys
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.fx.experimental._config
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn


@dataclass
class MixerConfig:
    """M-MATE settings. The paper fixes the two-branch design; these sizes are our documented defaults.

    conv_kernel: Flex-MA's short causal convolution;
    window_frames/rows/cols: Local-Swin's 3D window over visual grids (2D for an image: frames=1);
    text_window: how many previous tokens (any modality, itself included) a text token attends to;
    branches: "both" (M-MATE), or one branch alone: "flex" (stage 1, ablation) or "swin" (ablation);
    rotary_scan: Flex-MA reads each visual grid in a major order that rotates from layer to layer
      (Rotary Major-Scan, see major_order); off, every layer scans the prompt's own order;
    dt_max, A_max: Flex-MA's initial step sizes and decay rates, spread over the heads: dt
      log-spaced in [1e-3, dt_max], A evenly in [1, A_max] (they only set a conversion's starting
      point: a checkpoint holds the trained values).
    The SSD scan's chunk length is not a property of the model but of the device: see Tuning.
    """

    conv_kernel: int = 4
    window_frames: int = 2
    window_rows: int = 4
    window_cols: int = 4
    text_window: int = 128
    branches: str = "both"
    rotary_scan: bool = True
    dt_max: float = 0.1
    A_max: float = 16.0


@dataclass(frozen=True)
class Tuning:
    """How the decoder cuts a long prompt into work on one kind of device. These settings change
    speed and memory, never the result (beyond rounding), so they belong to the machine, not to
    the model. The values in TUNING come from the measurements below.

    piece_tokens: the prompt is worked through this many tokens at a time, None for all at once
      (see pieces). A CPU wants small pieces, whose temporaries stay in its caches (2048 took
      LinMU's prefill at 19k video tokens from 7.35 to 3.9 s in bench.py on a 2-core CPU); a GPU
      wants the whole prompt, a few large kernels per layer instead of many small ones.
    chunk_size: the SSD scan's chunk length Q (see ssd_scan). On an H100 (torch 2.11, bf16, 65,536
      tokens, 9 heads, commit 2cdb546), ssd_scan took 3.2, 3.7 and 5.1 ms eager at Q = 64, 128 and
      256, with peaks of 982, 873 and 1,452 MiB, and a whole M-MATE decoder layer at 75,800 tokens
      22.4 and 23.4 ms at Q = 64 and 128, with peaks of 3,774 and 3,525 MiB; an earlier version's
      Q = 256 did not compile (an inductor error in torch 2.11's scan code generation). 128 it is,
      for the memory. On a 2-core CPU (Intel Xeon, torch 2.14.1, float32, medians of runs that
      alternate the two), Q = 32 against 64: Flex-MA's prefill at 18,968 video tokens 0.83 against
      0.94 s, a whole M-MATE layer 1.70 against 1.76 s (Q = 16: 2.03 s), and toy.py's stage-2
      training step, 84 tokens a sequence, 139 against 159 ms. 32 it is.
    chunks_per_block: the SSD scan's step 3 carries the state within blocks of this many chunks R,
      then across blocks (see carry_across_chunks); what is scanned at once is padded to at least
      two blocks. A GPU keeps 16, the value of every GPU measurement here. A CPU's pieces have 65
      chunks and the toy's sequences 3, padded to 80 and 32 chunks with R = 16, to 72 and 16 with
      R = 8; on the 2-core CPU above, R = 8 against 16: toy.py's training step 130 against 143 ms,
      Flex-MA's prefill at 18,968 video tokens 0.90 against 0.94 s. 8 it is.
    """

    piece_tokens: int | None
    chunk_size: int
    chunks_per_block: int


TUNING = {"cpu": Tuning(piece_tokens=2048, chunk_size=32, chunks_per_block=8),
          "cuda": Tuning(piece_tokens=None, chunk_size=128, chunks_per_block=16)}


def tuning(device: torch.device) -> Tuning:
    return TUNING["cuda" if device.type == "cuda" else "cpu"]


# ----------------------------------------------------------------------------------------------
# Building blocks shared by the teacher and the student


class RMSNorm(nn.Module):
    """Root-mean-square layer norm (Llama's), computed in at least float32."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        wide = x.to(torch.promote_types(x.dtype, torch.float32))
        wide = wide * torch.rsqrt(wide.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * wide.to(x.dtype)


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (Llama's rotate-half form). x: (B, L, H, Dh); cos, sin: (B, L, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


@dataclass
class TokenLayout:
    """Where each token of a (B, L) multimodal prompt sits.

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
    def build(cls, input_ids: Tensor, image_token_id: int,
              grids: list[list[tuple[int, int, int]]] | None) -> TokenLayout:
        """Lay out a prompt: the image tokens of row b fill grids[b] in order, each frame row-major."""
        batch, length = input_ids.shape
        device = input_ids.device
        grid_shapes = [list(map(tuple, g)) for g in grids] if grids is not None else [[] for _ in range(batch)]
        if len(grid_shapes) != batch:
            raise ValueError(f"grids has {len(grid_shapes)} entries for a batch of {batch}: give one list of "
                             "(frames, rows, cols) per sequence")
        visual = input_ids == image_token_id
        cells = torch.full((batch, length, 4), -1, dtype=torch.long, device=device)
        for b, shapes in enumerate(grid_shapes):
            where = visual[b].nonzero().squeeze(1)
            sizes = [f * r * c for f, r, c in shapes]
            if sum(sizes) != len(where):
                raise ValueError(f"sequence {b} has {len(where)} image tokens but its grids {shapes} hold "
                                 f"{sum(sizes)}: pass the grids the processor returned with these input_ids")
            for g, ((f, r, c), idx) in enumerate(zip(shapes, where.split(sizes))):
                t, y, x = torch.meshgrid(*(torch.arange(n, device=device) for n in (f, r, c)), indexing="ij")
                cells[b, idx] = torch.stack([torch.full_like(t, g), t, y, x], -1).reshape(-1, 4)
        positions = torch.arange(length, device=device).expand(batch, length)
        return cls(positions, visual, cells, grid_shapes)


def pieces(length: int, size: int | None) -> list[slice]:
    """Consecutive slices of at most `size` (None: one slice) covering range(length).

    Flex-MA's scan, Local-Swin's windows and the per-token parts of every decoder layer work
    through a long prompt a piece at a time, each piece continuing from where the previous one
    ended: the same result as one pass, with temporaries that do not grow with the prompt. On a
    CPU that is most of the speed: a piece's temporaries stay in cache and are reused by the
    allocator, where whole-prompt temporaries are fresh memory, paged in on every call. On a GPU
    the opposite holds, and the whole prompt is one piece (Tuning)."""
    if size is None:
        return [slice(0, length)]
    count = max(1, -(-length // size))  # the pieces; under torch.compile a guard on this count, not on the length
    return [slice(i * size, (i + 1) * size) for i in range(count - 1)] + [slice((count - 1) * size, length)]


def per_token(fn, *xs: Tensor) -> Tensor | tuple[Tensor, ...]:
    """fn(*xs) for a function that treats every token alone (norms, MLPs, gates, projections):
    xs (B, L, ...), a piece of tokens at a time (Tuning.piece_tokens), so that only the result (a
    tensor, or a tuple of them if fn returns one) spans the whole prompt."""
    spans = pieces(xs[0].shape[1], tuning(xs[0].device).piece_tokens)
    if len(spans) == 1:
        return fn(*xs)
    outputs = [fn(*(x[:, piece] for x in xs)) for piece in spans]
    if isinstance(outputs[0], Tensor):
        return torch.cat(outputs, dim=1)
    return tuple(torch.cat(parts, dim=1) for parts in zip(*outputs))


class AttentionProjections(nn.Module):
    """The q/k/v/o projections of grouped-query self-attention, with RoPE on q and k. The teacher's
    attention and Local-Swin (which starts as a copy of it) are both built on them."""

    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: int):
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=False)

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, n, D) -> q (B, n, H, Dh), k and v (B, n, Hkv, Dh), RoPE on q and k."""
        q = self.q_proj(x).unflatten(-1, (self.num_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.num_kv_heads, self.head_dim))
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin), v


@dataclass
class KVCache:
    """Keys (after RoPE) and values kept for decoding, in buffers allocated once and written in
    place: (B, kv heads, slots, Dh). The teacher keeps every token (slot = position, with room for
    the tokens to generate); Local-Swin a ring of its text window (slot = position mod window).
    Slots not yet written hold zeros and are masked out."""

    k: Tensor
    v: Tensor


def cached_attention(q: Tensor, cache: KVCache, visible: Tensor) -> Tensor:
    """One new token per sequence attends to the cache's visible slots: q (B, 1, H, Dh), visible
    (slots,) bool -> (B, 1, H Dh). (On an H100 at 75k cached tokens this form, SDPA with
    enable_gqa, measured 10x faster than laying a kv head's query heads along the query axis.)"""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k, cache.v, attn_mask=visible[None],
                                       enable_gqa=True)  # (B, H, 1, Dh)
    return y.transpose(1, 2).flatten(2)


# ----------------------------------------------------------------------------------------------
# 1. The chunked SSD scan (Mamba2's state space duality, Dao & Gu 2024): the engine of Flex-MA


def segment_sum(a: Tensor) -> Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, and -inf for i < j.

    Built as a cumulative sum of a masked copy of a, never as a difference of two long partial
    sums, so it stays exact for long chunks (ssd_minimal's stable form). a: (..., T) -> (..., T, T).
    """
    T = a.size(-1)
    a = a[..., None].expand(*a.shape, T)  # (..., T, T), a[..., i, j] = a_i
    above = torch.ones(T, T, dtype=torch.bool, device=a.device).triu()  # j >= i
    sums = a.masked_fill(above, 0).cumsum(dim=-2)
    return sums.masked_fill_(above.triu(1), -math.inf)  # in place: cumsum's backward does not need its output


def carry_across_chunks(chunk_states: Tensor, chunk_log_decay: Tensor, state: Tensor,
                        chunks_per_block: int) -> tuple[Tensor, Tensor]:
    """SSD's step 3: the state entering each chunk, s_c = exp(a_{c-1}) s_{c-1} + own_{c-1}, s_0 = state.

    chunk_states: (B, H, c, P, N) each chunk's own final state (own_c); chunk_log_decay: (B, H, c)
    the log decay a_c across chunk c; state: (B, H, P, N) before the first chunk. Returns the state
    entering each chunk (B, H, c, P, N) and the state after the last one (B, H, P, N).

    ssd_minimal writes this recurrence as one matmul with a (c x c) segment-sum of decays, whose
    cost grows with c^2. Here it has two levels, each one segment-sum matmul, so that the cost
    stays linear and the number of torch operations does not depend on c:
      * within blocks of R = chunks_per_block chunks, from the block's own chunks ((R+1) x R per block);
      * across blocks, from each block's own final state and `state`: ((c/R + 1) x (c/R + 1)), a
        quadratic term with a small constant: with R = 16, P = N = 64 and Q = 128 (a GPU's whole
        prompt) its FLOPs are about 0.3% of steps 1, 2 and 4's at 75k tokens and 4% at a million;
        with a CPU's R = 8 and Q = 32, 1.6% in its 2048-token pieces.
    """
    batch, heads, chunks, P, N = chunk_states.shape
    R = chunks_per_block
    blocks = torch.sym_max(2, chunks // R + 1)  # at least one padded chunk (no input, no decay), two blocks: see ssd_scan
    pad = blocks * R - chunks
    own = F.pad(chunk_states.flatten(3), (0, 0, 0, pad)).unflatten(2, (blocks, R))  # (B, H, b, R, PN)
    log_decay = F.pad(chunk_log_decay, (0, pad)).unflatten(2, (blocks, R))  # (B, H, b, R)

    # within a block: decay[r, j] = exp(a_j + ... + a_{r-1}) for j <= r, over the R + 1 boundaries
    decay = torch.exp(segment_sum(F.pad(log_decay, (1, 0))))  # (B, H, b, R+1, R+1)
    # row r < R: what enters chunk r from the block's earlier chunks; row R: the block's own final state
    within = decay[..., 1:] @ own  # (B, H, b, R+1, PN)

    # across blocks, ssd_minimal's form: row k is the state entering block k, row b the final state
    finals = torch.cat([state.flatten(2)[:, :, None], within[:, :, :, R]], dim=2)  # (B, H, b+1, PN)
    block_log_decay = F.pad(log_decay.sum(-1), (1, 0))  # (B, H, b+1)
    entering_blocks = torch.exp(segment_sum(block_log_decay)) @ finals  # (B, H, b+1, PN)

    # entering chunk r of block k: block k's entering state decayed to chunk r, plus the block's own part
    entering = torch.addcmul(within[..., :R, :], decay[..., :R, :1], entering_blocks[:, :, :-1, None])
    entering = entering.flatten(2, 3)[:, :, :chunks].unflatten(-1, (P, N))  # (B, H, c, P, N)
    return entering, entering_blocks[:, :, -1].unflatten(-1, (P, N))


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, chunks_per_block: int,
             initial_state: Tensor | None = None, exclusive: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The selective-SSM recurrence, computed chunk by chunk (Mamba2's SSD algorithm).

        h_t = exp(dt_t * A) * h_{t-1} + dt_t * (x_t outer B_t),    y_t = h_t . C_t
    or, for the sequences where exclusive is True, y_t = exp(dt_t * A) h_{t-1} . C_t: the output
    leaves out token t's own input.

    x: (B, L, H, P); dt: (B, L, H), positive; A: (H,), negative; B, C: (B, L, G, N), H a multiple
    of G; chunk_size Q and chunks_per_block R, a device's Tuning (speed, not the result);
    initial_state: (B, H, P, N) or None (zeros); exclusive: (B,) bool or None (none). Returns
    y (B, L, H, P) in x's dtype and the final state (B, H, P, N) in the float32 (float64 for
    float64 inputs) the scan accumulates in.

    Four steps per chunk of Q tokens: (1) outputs from inputs inside the chunk, a Q x Q masked
    matmul; (2) each chunk's state from its own inputs; (3) the state carried from chunk to chunk
    (carry_across_chunks); (4) outputs from the carried-in state. The cost is O(L Q (N + P) H):
    linear in L, in a fixed number of batched operations whatever L is.
    Precision, as in Mamba2's own kernels: the matmuls take their operands in the inputs' dtype (on
    a GPU, bf16: tensor cores, and half the bytes of the Q x Q scores) and accumulate in float32;
    the decays, the carried state and step 3 are float32 throughout.
    """
    batch, length, heads, head_dim = x.shape
    if heads % B.shape[2]:
        raise ValueError(f"ssd_scan: {heads} heads is not a multiple of {B.shape[2]} B/C groups")
    dtype = x.dtype
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # Padded steps have dt = 0: no input and no decay, the state unchanged. There is always at least
    # one, and at least two chunks, so that every length gives the same shape arithmetic and no size
    # of 1, which torch.compile would specialise on: one graph serves every length.
    chunks = torch.sym_max(2, length // chunk_size + 1)
    pad = chunks * chunk_size - length

    def chunked(t: Tensor, dtype: torch.dtype) -> Tensor:  # (B, L, H, ...) -> (B, H, c, Q, ...), zero-padded: one copy
        out = t.new_zeros(batch, t.shape[2], chunks * chunk_size, *t.shape[3:], dtype=dtype)
        out[:, :, :length] = t.movedim(1, 2)
        return out.unflatten(2, (chunks, chunk_size))

    if heads != B.shape[2]:
        B, C = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (B, C))
    x, B, C, dt = chunked(x, dtype), chunked(B, dtype), chunked(C, dtype), chunked(dt, acc)  # (B, H, c, Q, ...)
    x_dt = (x * dt[..., None]).to(dtype)  # (B, H, c, Q, P)
    log_decay = dt * A.to(acc)[:, None, None]  # (B, H, c, Q)
    cum = log_decay.cumsum(dim=-1)

    # 1. Within each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j (j < i if exclusive).
    # A difference of the chunk's running sums, as in steps 2 and 4 and in Mamba2's kernels: within one
    # chunk it is exact enough, and it costs one Q x Q temporary, which torch.compile fuses away
    # (segment_sum's cumulative form is for step 3's long spans).
    position = torch.arange(chunk_size, device=x.device)
    behind = position[:, None] - position[None, :]  # (Q, Q): i - j
    nearest = 0 if exclusive is None else exclusive.long()[:, None, None, None, None]  # the closest j allowed: i or i - 1
    decay = (cum[..., :, None] - cum[..., None, :]).masked_fill_(behind < nearest, -math.inf)  # (B, H, c, Q, Q)
    scores = (C @ B.transpose(-1, -2)).mul_(decay.exp_())  # (B, H, c, Q, Q), in place: the largest temporaries
    del decay
    y = scores @ x_dt  # (B, H, c, Q, P)
    del scores

    # 2. Each chunk's final state from its own inputs, decayed to the chunk's end
    to_end = (cum[..., -1:] - cum).exp()  # (B, H, c, Q)
    chunk_states = (x_dt.transpose(-1, -2) @ (B * to_end[..., None]).to(dtype)).to(acc)  # (B, H, c, P, N)

    # 3. Carry the state across chunks: entering[:, :, c] is the state before chunk c
    state = (torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=acc, device=x.device)
             if initial_state is None else initial_state.to(acc))
    entering, state = carry_across_chunks(chunk_states, cum[..., -1], state, chunks_per_block)  # (B, H, c, P, N), (B, H, P, N)

    # 4. Outputs from the carried-in state, decayed to each position
    y = y.add_((C * cum.exp()[..., None].to(dtype)) @ entering.transpose(-1, -2).to(dtype))  # (B, H, c, Q, P)
    y = y.reshape(batch, heads, chunks * chunk_size, head_dim)[:, :, :length].transpose(1, 2)  # (B, L, H, P)
    return y, state


# ----------------------------------------------------------------------------------------------
# 2. Flex-MA: the paper's bidirectional state-space branch for global context


MAJOR_ORDERS = ((1, 2, 3), (1, 3, 2), (2, 3, 1), (3, 2, 1))  # cell axes, slowest first: 1 frame, 2 row, 3 col


def major_order(layout: TokenLayout, axes: tuple[int, int, int]) -> tuple[Tensor, Tensor]:
    """Rotary Major-Scan (our reading of the paper and of LinGen, where it comes from): each
    visual grid's tokens re-laid, in the order `axes` gives (slowest first), into the positions
    the grid's tokens hold in the prompt; text tokens stay where they are.

    The four orders of MAJOR_ORDERS, one per layer in turn, are: frame by frame row-major (the
    prompt's own order), frame by frame column-major, and the two time-major orders, every cell's
    frames in a row (rows then columns, columns then rows); an image tile has one frame, so its
    orders are row- and column-major. Tokens adjacent along any axis become neighbours of the
    scan in some layer. A frame's text marker may so follow tokens of later frames in a
    time-major layer: the prompt is read at once, and generated text, after every grid, stays causal.
    Returns (order, inverse), (B, L) each: x.gather(1, order) is the scanned sequence, and
    y.gather(1, inverse) puts the scan's outputs back in the prompt's order.
    """
    batch, length = layout.visual.shape
    device = layout.visual.device
    flat = layout.visual.flatten().nonzero().squeeze(1)  # (V,) visual positions, grid by grid
    cells = layout.cells.flatten(0, 1)[flat]  # (V, 4): grid, frame, row, col
    span = int(cells.max()) + 1 if len(flat) else 1  # more than any grid index or coordinate
    key = flat // length  # the sequence, then the grid, then the axes in order
    for axis in (0, *axes):
        key = key * span + cells[:, axis]
    order = torch.arange(batch * length, device=device)
    order[flat] = flat[torch.argsort(key)]  # the j-th visual position takes the j-th token in the major order
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(batch * length, device=device)
    return order.view(batch, length) % length, inverse.view(batch, length) % length


@dataclass
class FlexMACache:
    """Flex-MA's decoding state, updated in place: the last conv_kernel - 1 conv inputs (B, C, K-1) and the SSM state (B, H, P, N)."""

    conv: Tensor
    ssm: Tensor


class FlexMA(nn.Module):
    """Flexible Mamba: a Mamba2 mixer whose scan runs both ways over visual tokens, forward only over text.

    One input projection gives [z | x | B | C | dt]; x, B, C pass a short depthwise causal
    convolution and SiLU; dt = softplus(dt + dt_bias); A = -exp(A_log). The SSD scan then runs
      * forward over the whole sequence (causal, so text stays autoregressive), and
      * backward over the visual tokens only: the flipped sequence, with the text tokens' conv
        inputs and dt set to zero (dt = 0 passes the state through unchanged), through a second
        causal convolution (anti-causal in the original order); its output reaches visual tokens only.
    So a text token never sees a later token, and an image/video token sees the whole visual context.

    Our choices where the paper is silent:
      * no token is counted twice: the forward scan covers s <= t (its own token included, like
        causal attention), the backward scan s > t: its own diagonal term (C_t . B_t) dt_t x_t is
        left out (ssd_scan's exclusive mode; Hydra drops both diagonals through a one-step shift
        and adds a D term; keeping the forward diagonal keeps text tokens exactly Mamba2);
      * D x_t is added once, from the forward features;
      * heads = attention heads, head dim P = attention head dim, one B/C group per head and state
        size N = head dim, so that the attention weights map onto it (see MMATE.from_attention);
      * the gate is norm(y * silu(z)), a per-head RMSNorm (the normalizer softmax attention has and
        a linear scan lacks), and z = W_z u + z_bias: the bias (not in Mamba2) lets the gate start as
        a constant, W_z = 0, instead of zero or noise.
    """

    def __init__(self, d_model: int, heads: int, head_dim: int, cfg: MixerConfig, eps: float = 1e-5):
        super().__init__()
        self.heads, self.head_dim, self.d_state = heads, head_dim, head_dim
        self.d_inner = heads * head_dim
        self.conv_dim = self.d_inner + 2 * heads * self.d_state  # x, B, C
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + heads, bias=False)  # [z | x | B | C | dt]
        self.z_bias = nn.Parameter(torch.ones(self.d_inner))
        self.conv_forward = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim)
        self.conv_backward = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim)
        # Spread evenly over the heads instead of drawn at random (so conversion is deterministic):
        # dt log-spaced in [1e-3, dt_max] (stored through softplus's inverse), A in [1, A_max].
        dt = torch.logspace(-3, math.log10(cfg.dt_max), heads)
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.linspace(1, cfg.A_max, heads).log())
        self.D = nn.Parameter(torch.zeros(heads))
        self.norm = RMSNorm(head_dim, eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _split(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (B, L, D) -> z (B, L, H*P), xBC (B, L, conv_dim) before the convolution, dt (B, L, H).

        Three products with the row blocks of in_proj rather than one split afterwards, so that each
        part is a contiguous tensor: the convolution's elementwise passes over a strided slice of
        a (L, 2313) product ran several times slower on a GPU."""
        return tuple(F.linear(u, w) for w in self.in_proj.weight.split([self.d_inner, self.conv_dim, self.heads]))

    def _features(self, xBC: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Causal depthwise conv + SiLU, then split, for d directions stacked along the batch:
        xBC (d B, K - 1 + n, conv_dim), the n inputs after the K - 1 before them; weight (d, conv_dim, K)
        and bias (d, conv_dim), each direction's convolution -> x (d B, n, H, P), B and C (d B, n, H, N).

        The convolution is written as K shifted multiply-adds along the sequence: for depthwise
        kernels this is faster than nn.Conv1d, needs no transposes, and takes one kernel per direction."""
        directions, K = weight.shape[0], weight.shape[-1]
        n = xBC.shape[1] - (K - 1)
        seq = xBC.unflatten(0, (directions, -1))  # (d, B, K - 1 + n, conv_dim)
        weight, bias = weight[:, None, None], bias[:, None, None]  # (d, 1, 1, conv_dim, K), (d, 1, 1, conv_dim)
        out = torch.addcmul(bias, seq[:, :, :n], weight[..., 0])
        for k in range(1, K):
            out.addcmul_(seq[:, :, k:k + n], weight[..., k])  # in place: addcmul's backward does not read out
        x, B, C = F.silu(out.flatten(0, 1)).split([self.d_inner, self.d_inner, self.d_inner], dim=-1)
        return (x.unflatten(-1, (self.heads, self.head_dim)), B.unflatten(-1, (self.heads, self.d_state)),
                C.unflatten(-1, (self.heads, self.d_state)))

    def _scan(self, xBC: Tensor, dt: Tensor, visual: Tensor | None) -> tuple[Tensor, Tensor]:
        """Both directions of Flex-MA over the whole prompt, as one batch of scans, a piece at a time
        (Tuning.piece_tokens).

        The forward direction is conv_forward and the scan over s <= t, plus D x_t. The backward
        direction is the same computation on the reversed sequence, with the text tokens' conv
        inputs and dt zeroed, conv_backward and the exclusive scan (s > t); its pieces are the
        forward pieces' mirror images, so that each piece of both directions is one scan, the
        backward direction a second batch of sequences behind the forward one. Each piece reads the
        K - 1 conv inputs before it in scan order (zeros before the first token) and starts from
        the state its direction's previous piece ended in.
        xBC: (B, L, conv_dim), dt: (B, L, H); visual: (B, L) bool, or None for no backward
        direction -> y (B, L, H, P), and the forward direction's final state.
        """
        batch, length, _ = xBC.shape
        convs = [self.conv_forward] if visual is None else [self.conv_forward, self.conv_backward]
        weight = torch.stack([conv.weight[:, 0] for conv in convs])  # (d, conv_dim, K)
        bias = torch.stack([conv.bias for conv in convs])  # (d, conv_dim)
        K = weight.shape[-1]
        exclusive = torch.arange(len(convs) * batch, device=xBC.device) >= batch  # the backward direction's sequences
        A = -self.A_log.exp()
        settings = tuning(xBC.device)
        y, state = xBC.new_zeros(batch, length, self.heads, self.head_dim), None  # both directions add into y
        for piece in pieces(length, settings.piece_tokens):
            n = piece.stop - piece.start
            inputs, d = [xBC[:, max(0, piece.start - (K - 1)):piece.stop]], [dt[:, piece]]  # the piece, the K - 1 before
            if visual is not None:  # the mirror piece and the K - 1 after it, reversed; text tokens: no input, no decay
                mirror = slice(length - piece.stop, length - piece.start)
                after = slice(mirror.start, mirror.stop + K - 1)  # clipped at the sequence's end
                inputs.append((xBC[:, after] * visual[:, after, None]).flip(1))
                d.append((dt[:, mirror] * visual[:, mirror, None]).flip(1))
            inputs = torch.cat([F.pad(t, (0, 0, K - 1 + n - t.shape[1], 0)) for t in inputs])  # (d B, K - 1 + n, conv_dim)
            x, B, C = self._features(inputs, weight, bias)
            del inputs  # freed before the scan's temporaries
            out, state = ssd_scan(x, torch.cat(d), A, B, C, settings.chunk_size, settings.chunks_per_block,
                                  state, exclusive)  # (d B, n, H, P)
            y[:, piece].add_(out[:batch]).addcmul_(self.D[:, None], x[:batch])
            if visual is not None:  # back in the original order, to visual tokens only
                y[:, mirror].addcmul_(out[batch:].flip(1), visual[:, mirror, None, None])
        return y, state[:batch]

    def _output(self, y: Tensor, z: Tensor) -> Tensor:
        """Gated per-head RMSNorm and output projection: y (B, n, H, P), z (B, n, H*P) -> (B, n, D)."""
        gate = F.silu(z + self.z_bias).unflatten(-1, (self.heads, self.head_dim))
        return self.out_proj(self.norm(y * gate).flatten(2))

    def forward(self, u: Tensor, visual: Tensor | None,
                scan: tuple[Tensor, Tensor] | None = None) -> tuple[Tensor, FlexMACache]:
        """Full-sequence pass. u: (B, L, D); visual: (B, L) bool, or None for a prompt without visual
        tokens (no backward scan); scan: this layer's (order, inverse) of Rotary Major-Scan, or None
        to scan the prompt's own order. Returns (B, L, D) and the decoding cache."""
        if scan is not None:  # visual positions stay visual: the mask holds for the permuted sequence
            u = u.gather(1, scan[0][..., None].expand_as(u))
        z, xBC, dt = self._split(u)
        dt = F.softplus(dt + self.dt_bias)  # (B, L, H)
        y, ssm = self._scan(xBC, dt, visual)  # (B, L, H, P)
        K = self.conv_forward.kernel_size[0]
        last = xBC[:, max(0, xBC.shape[1] - (K - 1)):].transpose(1, 2)  # the last K-1 inputs (fewer for short prompts)
        conv_state = F.pad(last, (K - 1 - last.shape[-1], 0))  # (B, C, K-1)
        out = per_token(self._output, y, z)
        if scan is not None:
            out = out.gather(1, scan[1][..., None].expand_as(out))  # back in the prompt's order
        return out, FlexMACache(conv_state, ssm)

    def step(self, u: Tensor, cache: FlexMACache) -> Tensor:
        """One new text token, O(1) in the context length: u (B, 1, D) -> (B, 1, D); the cache is updated in place."""
        z, xBC, dt = self._split(u)
        window = torch.cat([cache.conv, xBC.transpose(1, 2)], dim=-1)  # (B, C, K)
        cache.conv.copy_(window[..., 1:])
        xBC = F.silu((window * self.conv_forward.weight.squeeze(1)).sum(-1) + self.conv_forward.bias)  # (B, C)
        x, B, C = (t.unflatten(-1, (self.heads, -1)) for t in xBC.split([self.d_inner] * 3, dim=-1))
        acc = cache.ssm.dtype  # the scan's accumulation precision
        dt = F.softplus(dt[:, 0] + self.dt_bias).to(acc)  # (B, H)
        decay = torch.exp(dt * -self.A_log.exp())[..., None, None]
        cache.ssm.mul_(decay).add_((dt[..., None] * x.to(acc))[..., None] * B.to(acc)[:, :, None, :])  # (B, H, P, N)
        y = (cache.ssm @ C.to(acc)[..., None]).squeeze(-1).to(x.dtype) + self.D[:, None] * x  # (B, H, P)
        return self._output(y[:, None], z)


# ----------------------------------------------------------------------------------------------
# 3. Local-Swin: the paper's Swin-style window attention branch for adjacent correlations


@dataclass
class Windows:
    """Groups of tokens that attend among themselves: window w's queries attend to its keys where mask allows.

    Positions are flat indices into the (B * L) tokens of a batch. queries: (W, Sq); keys: (W, Sk);
    mask: (W, Sq or 1, Sk), True where a query may attend to a key (every query row allows at least
    one key); writes: (W, Sq), True for the queries whose output this window gives (each token is
    written by exactly one window; other entries are padding or belong to another window)."""

    queries: Tensor
    keys: Tensor
    mask: Tensor
    writes: Tensor


def swin_windows(layout: TokenLayout, window: tuple[int, int, int], shifted: bool) -> Windows:
    """The visual tokens of a layout grouped into Swin windows over their (frames, rows, cols) grids.

    Along each axis of length n the window is w = min(window, n) (clipped to small grids). Shifted
    windows start half a window in, as Swin's cyclic roll by w // 2 plus its region mask does:
    cells [0, w//2) form their own (partial) window, then [w//2, w//2 + w), ...; an axis no longer
    than its window is not shifted. Tokens of different grids never share a window. Queries and
    keys are the window's tokens (S of them, padded with a dummy 0 where a window has fewer).
    """
    batch, length = layout.visual.shape
    device = layout.visual.device
    flat = layout.visual.flatten().nonzero().squeeze(1)  # (V,) flat positions of visual tokens
    cells = layout.cells.flatten(0, 1)[flat]  # (V, 4): grid, frame, row, col
    sample = flat // length
    most = max((len(g) for g in layout.grid_shapes), default=0)
    shapes = torch.tensor([list(g) + [(1, 1, 1)] * (most - len(g)) for g in layout.grid_shapes],
                          dtype=torch.long, device=device).reshape(batch, most, 3)
    size = shapes[sample, cells[:, 0]]  # (V, 3): the token's grid shape
    win = torch.minimum(torch.tensor(window, device=device), size)
    offset = (win - win // 2) * (shifted & (size > win))
    cell_window = (cells[:, 1:] + offset) // win  # (V, 3)
    key = torch.cat([sample[:, None], cells[:, :1], cell_window], dim=1)
    _, window_id = torch.unique(key, dim=0, return_inverse=True)  # (V,)
    order = torch.argsort(window_id, stable=True)
    counts = torch.bincount(window_id)
    rank = torch.arange(len(order), device=device) - (counts.cumsum(0) - counts)[window_id[order]]
    index = torch.zeros(len(counts), int(counts.max()), dtype=torch.long, device=device)
    valid = torch.zeros_like(index, dtype=torch.bool)
    index[window_id[order], rank] = flat[order]
    valid[window_id[order], rank] = True
    return Windows(index, index, valid[:, None, :], valid)


TEXT_BLOCK = 16  # text queries are windowed in blocks of this many consecutive positions


def text_windows(layout: TokenLayout, text_window: int) -> Windows:
    """Causal sliding windows for the text tokens: each attends to the text_window positions ending at itself.

    Consecutive positions form blocks of b = min(TEXT_BLOCK, text_window) queries, whose keys are
    the b + text_window - 1 positions ending at the block's last; a block becomes a window only if
    it holds a text query, so the cost is O(text tokens * text_window), and nothing for visual rows.
    """
    batch, length = layout.visual.shape
    device = layout.visual.device
    block = min(TEXT_BLOCK, text_window)
    blocks = -(-length // block)
    starts = torch.arange(blocks, device=device)[:, None] * block
    query_pos = starts + torch.arange(block, device=device)  # (blocks, b)
    key_pos = starts + torch.arange(1 - text_window, block, device=device)  # (blocks, S)
    behind = query_pos[:, :, None] - key_pos[:, None, :]  # (blocks, b, S)
    inside = (key_pos >= 0) & (key_pos < length)
    mask = (behind >= 0) & (behind < text_window) & inside[:, None, :]  # rows past the end still reach position L-1
    text = F.pad(~layout.visual, (0, blocks * block - length)).unflatten(1, (blocks, block))  # (B, blocks, b)
    sample, kept = text.any(-1).nonzero(as_tuple=True)  # the blocks with a text query
    offset = sample[:, None] * length
    return Windows(offset + query_pos[kept].clamp(max=length - 1), offset + key_pos[kept].clamp(0, length - 1),
                   mask[kept], text[sample, kept])


@dataclass
class LocalWindows:
    """All of Local-Swin's windows over one prompt: the text windows and the Swin windows (None
    when the prompt has no text, or no visual token) and, for each of the B * L tokens, the row of
    the windows' concatenated outputs (text windows' query slots, then Swin windows') that holds its output."""

    text: Windows | None
    swin: Windows | None
    source: Tensor

    @property
    def present(self) -> list[Windows]:
        """The kinds of window this prompt has, in the order their query slots are laid out."""
        return [w for w in (self.text, self.swin) if w is not None]

    @classmethod
    def build(cls, layout: TokenLayout, text: Windows | None, swin: Windows | None) -> LocalWindows:
        source = torch.empty(layout.visual.numel(), dtype=torch.long, device=layout.visual.device)  # (B * L,)
        start = 0
        for windows in cls(text, swin, source).present:
            slots = windows.writes.flatten().nonzero().squeeze(1)  # the query slots that give a token's output
            source[windows.queries.flatten()[slots]] = start + slots
            start += windows.writes.numel()
        return cls(text, swin, source)


def window_attention(q: Tensor, k: Tensor, v: Tensor, windows: Windows, out: Tensor) -> None:
    """Each window's queries attend to its keys, a piece of windows at a time (Tuning.piece_tokens
    queries), the outputs of all query slots written into out.

    q: (N, H, Dh); k, v: (N, Hkv, Dh), N = B * L flat tokens, H a multiple of Hkv; out: (W, Sq, H, Dh)."""
    gather = lambda t, index: t[index].transpose(1, 2)  # (N, h, Dh) -> (w, h, S, Dh)
    piece_tokens = tuning(q.device).piece_tokens
    per_piece = None if piece_tokens is None else max(1, piece_tokens // windows.queries.shape[1])
    for piece in pieces(len(windows.queries), per_piece):
        queries, keys = windows.queries[piece], windows.keys[piece]
        attended = F.scaled_dot_product_attention(gather(q, queries), gather(k, keys), gather(v, keys),
                                                  attn_mask=windows.mask[piece][:, None], enable_gqa=True)
        out[piece] = attended.transpose(1, 2)  # in place: one piece at a time


class LocalSwin(AttentionProjections):
    """Local-Swin: attention over neighbouring tokens only, linear in length for fixed windows.

    * Visual tokens attend within Swin windows over their own grid: 2D (rows, cols) windows over an
      image tile, 3D (frames, rows, cols) windows over a video; odd layers shift the windows by half
      (their PromptPlan holds the shifted windows).
    * Text tokens attend causally to the previous `text_window` tokens of any modality, so decoding
      keeps a ring of text_window keys and values, not the whole context.
    The projections are the teacher's q/k/v/o (copied at conversion) and the teacher's rotary
    embedding is applied before windowing, so inside a window the relative positions are the teacher's.
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: int, cfg: MixerConfig):
        super().__init__(d_model, heads, kv_heads, head_dim)
        self.text_window = cfg.text_window

    def forward(self, x: Tensor, rope: tuple[Tensor, Tensor], windows: LocalWindows) -> tuple[Tensor, KVCache]:
        """Full-sequence pass: x (B, L, D) -> (B, L, D) and the text window's ring for decoding."""
        batch, length, _ = x.shape
        q, k, v = (t.flatten(0, 1) for t in per_token(self.qkv, x, *rope))  # (B * L, h, Dh)
        slots = q.new_empty(sum(w.queries.numel() for w in windows.present), *q.shape[1:])  # every query slot
        start = 0
        for w in windows.present:
            window_attention(q, k, v, w, slots.narrow(0, start, w.queries.numel()).unflatten(0, w.queries.shape))
            start += w.queries.numel()
        out = slots[windows.source]  # (B * L, H, Dh): each token's output, from the window that gives it
        # the ring: position p in slot p mod W; the last W - 1 prompt tokens are in it (slots of
        # positions before the prompt, p < 0, get any finite values: they stay masked until overwritten)
        W = self.text_window
        last = torch.arange(length - (W - 1), length, device=x.device)  # (W - 1,)
        ring = [x.new_zeros(batch, self.num_kv_heads, W, self.head_dim).index_copy_(
            2, last % W, t.unflatten(0, (batch, length))[:, last.clamp(min=0)].transpose(1, 2)) for t in (k, v)]
        return self.o_proj(out.unflatten(0, (batch, length)).flatten(2)), KVCache(*ring)

    def step(self, x: Tensor, rope: tuple[Tensor, Tensor], position: Tensor, cache: KVCache) -> Tensor:
        """One new text token at `position` ((1,) tensor): x (B, 1, D) attends to the ring and itself -> (B, 1, D)."""
        q, k, v = self.qkv(x, *rope)
        slot = position % self.text_window
        cache.k.index_copy_(2, slot, k.transpose(1, 2))
        cache.v.index_copy_(2, slot, v.transpose(1, 2))
        filled = torch.arange(self.text_window, device=x.device) <= position  # all once position >= W - 1
        return self.o_proj(cached_attention(q, cache, filled))


# ----------------------------------------------------------------------------------------------
# 4. M-MATE: the paper's dual-branch block that replaces each decoder self-attention


@dataclass
class PromptPlan:
    """What one decoder layer needs to know about a prompt. TextModel.plan works out the plans of all
    layers once, before the first, so that no layer computes anything from the prompt's content or
    waits on the host. A student's layers differ only in what their plans hold (layer_pattern):
    shifted Swin windows or not, and the Rotary Major-Scan order, data and not code; so that one
    compiled graph serves every layer (compile_model).

    rope: (cos, sin), each (B, L, Dh); visual: (B, L) bool, or None when the prompt has no visual
    token; windows: this layer's Local-Swin windows, None for the teacher; scan: this layer's
    Rotary Major-Scan (order, inverse), None to scan the prompt's own order (the teacher, without
    rotary_scan or visual tokens, and the first of MAJOR_ORDERS); new_tokens: how many tokens the
    decoding caches leave room for after the prompt."""

    rope: tuple[Tensor, Tensor]
    visual: Tensor | None
    windows: LocalWindows | None
    scan: tuple[Tensor, Tensor] | None = None
    new_tokens: int = 0

    @classmethod
    def build(cls, layout: TokenLayout, rope: tuple[Tensor, Tensor], mixer: MixerConfig | None, layers: int,
              new_tokens: int = 0) -> list[PromptPlan]:
        """The plans of a prompt for `layers` decoder layers of the teacher (mixer None) or of a
        student with these M-MATE settings. Here, once per prompt, the host may wait on the device
        (nonzero, unique, counts); each kind of window and each scan order is built once and shared."""
        has_visual, has_text = bool(layout.visual.any()), not bool(layout.visual.all())
        visual = layout.visual if has_visual else None
        if mixer is None:
            return [cls(rope, visual, None, None, new_tokens)] * layers
        patterns = [layer_pattern(index) for index in range(layers)]
        scans = {order: major_order(layout, MAJOR_ORDERS[order]) if order and mixer.rotary_scan and has_visual else None
                 for order in {pattern["scan_order"] for pattern in patterns}}  # order 0 is the prompt's own
        text = text_windows(layout, mixer.text_window) if has_text else None
        shape = (mixer.window_frames, mixer.window_rows, mixer.window_cols)
        windows = {shifted: LocalWindows.build(layout, text, swin_windows(layout, shape, shifted) if has_visual else None)
                   for shifted in {pattern["shifted"] for pattern in patterns}}
        return [cls(rope, visual, windows[pattern["shifted"]], scans[pattern["scan_order"]], new_tokens)
                for pattern in patterns]


def layer_pattern(index: int) -> dict:
    """What changes from one M-MATE layer to the next (PromptPlan.build): odd layers shift their
    Swin windows, and the Rotary Major-Scan order rotates over MAJOR_ORDERS."""
    return {"shifted": index % 2 == 1, "scan_order": index % len(MAJOR_ORDERS)}


@dataclass
class MMATECache:
    """An M-MATE layer's decoding state: Flex-MA's recurrent state and Local-Swin's text window (None when off)."""

    flex: FlexMACache | None
    swin: KVCache | None


class MMATE(nn.Module):
    """Multimodal Mamba-Attention: a drop-in replacement for a decoder self-attention layer.

    Both branches read the same normalized input; a per-token gate g = sigmoid(w . x + b) mixes them:
        out = g * FlexMA(x) + (1 - g) * LocalSwin(x)
    (the paper interpolates the branches with per-token learned weights; this scalar-per-token
    sigmoid is our exact form). w = 0, b = 0 at initialization: an even mix of two branches that
    each start as an approximation of the teacher's attention. `branches` selects "both", or a
    single branch ("flex" in distillation stage 1 and ablations, "swin" in an ablation).
    Which layer of the decoder it is sets which windows and scan order its PromptPlan holds (layer_pattern).
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: int, cfg: MixerConfig, eps: float = 1e-5):
        super().__init__()
        self.flex = FlexMA(d_model, heads, head_dim, cfg, eps)
        self.swin = LocalSwin(d_model, heads, kv_heads, head_dim, cfg)
        self.gate = nn.Linear(d_model, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.branches = cfg.branches

    @classmethod
    def from_attention(cls, attn: AttentionProjections, d_model: int, cfg: MixerConfig, eps: float = 1e-5) -> MMATE:
        """Build an M-MATE layer from a (GQA) self-attention layer's q/k/v/o projections.

        Local-Swin takes q/k/v/o as they are. Flex-MA follows the attention-to-SSM mapping
        (linear attention's correspondence, as in "The Mamba in the Llama" and MaTVLM): C <- W_Q
        (scaled by 1/sqrt(head_dim), attention's temperature), B <- W_K, x <- W_V, out_proj <- W_O,
        with K and V rows repeated from the kv heads to every query head (GQA). The rest is ours:
        the convolutions start as the identity (last tap 1), W_z and the dt rows as 0 (so the gate
        and dt start input-independent), D as 0; dt_bias and A_log span MixerConfig's ranges over the heads.
        The result is a deterministic function of the attention weights.
        """
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        layer = cls(d_model, heads, kv_heads, head_dim, cfg, eps).to(attn.q_proj.weight)
        with torch.no_grad():
            for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
                getattr(layer.swin, name).weight.copy_(getattr(attn, name).weight)
            per_head = lambda w: w.unflatten(0, (kv_heads, head_dim)).repeat_interleave(heads // kv_heads, 0).flatten(0, 1)
            W_q, W_k, W_v = attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight
            flex = layer.flex
            flex.in_proj.weight.copy_(torch.cat([
                torch.zeros_like(W_q),  # z
                per_head(W_v),  # x
                per_head(W_k),  # B
                W_q / math.sqrt(head_dim),  # C
                torch.zeros(heads, d_model, dtype=W_q.dtype, device=W_q.device),  # dt
            ]))
            flex.out_proj.weight.copy_(attn.o_proj.weight)
            for conv in (flex.conv_forward, flex.conv_backward):
                conv.weight.zero_()
                conv.weight[..., -1] = 1
                conv.bias.zero_()
        return layer

    def forward(self, x: Tensor, plan: PromptPlan) -> tuple[Tensor, MMATECache]:
        """The mixer contract of the decoder, for the whole prompt: x (B, L, D) -> (B, L, D) and the decoding cache."""
        flex, flex_cache = self.flex(x, plan.visual, plan.scan) if self.branches != "swin" else (None, None)
        swin, swin_cache = (self.swin(x, plan.rope, plan.windows) if self.branches != "flex"
                            else (None, None))
        return self._mix(x, flex, swin), MMATECache(flex_cache, swin_cache)

    def step(self, x: Tensor, rope: tuple[Tensor, Tensor], position: Tensor, cache: MMATECache) -> Tensor:
        """One new text token, O(1) in the context: Flex-MA's recurrent step and Local-Swin's ring.
        x (B, 1, D) at `position` ((1,) tensor) -> (B, 1, D); the cache is updated in place."""
        flex = self.flex.step(x, cache.flex) if self.branches != "swin" else None
        swin = self.swin.step(x, rope, position, cache.swin) if self.branches != "flex" else None
        return self._mix(x, flex, swin)

    def _mix(self, x: Tensor, flex: Tensor | None, swin: Tensor | None) -> Tensor:
        if flex is None or swin is None:
            return swin if flex is None else flex
        return per_token(self._gated_sum, x, flex, swin)

    def _gated_sum(self, x: Tensor, flex: Tensor, swin: Tensor) -> Tensor:
        g = torch.sigmoid(self.gate(x))  # (B, n, 1)
        return torch.lerp(swin, flex, g)  # g * flex + (1 - g) * swin


# ----------------------------------------------------------------------------------------------
# 5. LoRA adapters (distillation stage 3)


class LoRALinear(nn.Module):
    """A frozen nn.Linear plus a trainable low-rank update: y = W x + (alpha / r) B A dropout(x).

    A: (r, in) starts random, B: (out, r) starts at zero, so the adapted layer equals the base
    layer at step 0. merge() folds B A into W (and unmerge() takes it out) for fast inference.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0):
        super().__init__()
        self.base = base.requires_grad_(False)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, dtype=base.weight.dtype, device=base.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, dtype=base.weight.dtype, device=base.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.scale = alpha / rank
        self.dropout = nn.Dropout(dropout)
        self.merged = False

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        if self.merged:
            return y
        return y + (self.dropout(x) @ self.lora_A.T @ self.lora_B.T) * self.scale

    @torch.no_grad()
    def merge(self) -> None:
        if not self.merged:
            self.base.weight += (self.lora_B @ self.lora_A) * self.scale
            self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if self.merged:
            self.base.weight -= (self.lora_B @ self.lora_A) * self.scale
            self.merged = False


def add_lora(model: nn.Module, targets: list[str], rank: int = 8, alpha: float = 16.0, dropout: float = 0.0) -> list[str]:
    """Wrap every nn.Linear whose name ends with one of `targets` (e.g. "mlp.up_proj") in a LoRALinear.

    Returns the wrapped module names; raises if a target matches nothing (a typo would otherwise
    silently train nothing).
    """
    wrapped = []
    for name, module in list(model.named_modules()):
        if isinstance(module, nn.Linear) and any(name == t or name.endswith("." + t) for t in targets):
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, LoRALinear(module, rank, alpha, dropout))
            wrapped.append(name)
    missing = [t for t in targets if not any(w == t or w.endswith("." + t) for w in wrapped)]
    if missing:
        raise ValueError(f"add_lora: no nn.Linear named like {missing}; module names look like "
                         f"{next(n for n, m in model.named_modules() if isinstance(m, nn.Linear))}")
    return wrapped


def merge_lora(model: nn.Module) -> None:
    """Fold every adapter into its base weight and put the plain nn.Linear back (checkpoint names unchanged)."""
    for name, module in list(model.named_modules()):
        if isinstance(module, LoRALinear):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent), child, module.base)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters an optimizer should see: name -> parameter, for those with requires_grad."""
    return {name: p for name, p in model.named_parameters() if p.requires_grad}


# ----------------------------------------------------------------------------------------------
# 6. The vision-language model (SmolVLM2)
#
# SmolVLM2 (Hugging Face's SmolVLM / Idefics3 family) is the teacher: a SigLIP vision encoder turns
# each 512x512 frame into 32x32 patch features, a pixel-shuffle connector folds every s x s block
# of them into one token of the Llama-style SmolLM2 decoder. Parameter names mirror the Hub
# checkpoint keys exactly, so a checkpoint loads with no key mapping.

SUPPORTED_MODEL_TYPES = ("smolvlm", "idefics3")


@dataclass
class VisionConfig:
    """SigLIP encoder sizes. Defaults are the ones transformers applies when config.json omits a key."""

    hidden_size: int = 1152
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 16
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "gelu_pytorch_tanh"
    layer_norm_eps: float = 1e-6


@dataclass
class TextConfig:
    """Llama decoder sizes. Defaults are the ones transformers applies when config.json omits a key
    (num_key_value_heads defaults to num_attention_heads, head_dim to hidden_size // num_attention_heads)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    max_position_embeddings: int = 2048
    hidden_act: str = "silu"

    def __post_init__(self):
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads


def mixer_config(d: dict) -> MixerConfig:
    """A checkpoint's "linmu" entry. Checkpoints written before the SSD chunk length became a
    device setting (Tuning) also hold "chunk_size", which no longer describes the model; those
    written before Rotary Major-Scan have no "rotary_scan" and keep scanning the prompt's order."""
    return MixerConfig(**{"rotary_scan": False, **{k: v for k, v in d.items() if k != "chunk_size"}})


@dataclass
class VLMConfig:
    """The whole model: vision and text sizes, the connector's scale_factor, the image placeholder token.

    dtype is the dtype the checkpoint's tensors are stored in (written back by save_model);
    linmu is set for a LinMU student, whose decoder attention layers are M-MATE mixers.
    """

    vision: VisionConfig = field(default_factory=VisionConfig)
    text: TextConfig = field(default_factory=TextConfig)
    scale_factor: int = 2
    image_token_id: int = 128257
    tie_word_embeddings: bool = False
    model_type: str = "smolvlm"
    dtype: str = "float32"
    linmu: MixerConfig | None = None

    @property
    def image_seq_len(self) -> int:
        """Decoder tokens per image (frame): (image_size / patch_size)^2 / scale_factor^2."""
        return (self.vision.image_size // self.vision.patch_size) ** 2 // self.scale_factor**2

    @classmethod
    def from_hf_dict(cls, d: dict) -> VLMConfig:
        """Read a Hugging Face SmolVLM/Idefics3 config.json (transformers 4.x or 5.x form); unknown keys are ignored."""
        model_type = d.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"unsupported architecture model_type={model_type!r}: only {SUPPORTED_MODEL_TYPES} "
                             "(SmolVLM / Idefics3 checkpoints) are supported")
        vision_d, text_d = d.get("vision_config", {}), d.get("text_config", {})
        if text_d.get("model_type", "llama") != "llama":
            raise ValueError(f"unsupported text model_type={text_d['model_type']!r}: "
                             "only a 'llama' decoder is supported")
        # transformers 5.x writes rope_parameters {"rope_theta", "rope_type"}; 4.x wrote rope_theta / rope_scaling
        rope = text_d.get("rope_parameters") or text_d.get("rope_scaling") or {}
        rope_type = rope.get("rope_type", rope.get("type", "default"))
        if rope_type != "default":
            raise ValueError(f"unsupported RoPE scaling {rope_type!r}: "
                             "only plain RoPE (rope_type 'default') is implemented")
        vision = VisionConfig(**{k: vision_d[k] for k in VisionConfig.__dataclass_fields__ if k in vision_d})
        text = TextConfig(**{k: text_d[k] for k in TextConfig.__dataclass_fields__ if k in text_d})
        text.rope_theta = float(rope.get("rope_theta", text_d.get("rope_theta", text.rope_theta)))
        for name, act, supported in (("vision", vision.hidden_act, "gelu_pytorch_tanh"),
                                     ("text", text.hidden_act, "silu")):
            if act != supported:
                raise ValueError(f"unsupported {name} hidden_act {act!r}: only {supported!r} is implemented")
        for flag in ("attention_bias", "mlp_bias"):
            if text_d.get(flag):
                raise ValueError(f"unsupported text_config.{flag}=true: "
                                 "only bias-free Llama projections are implemented")
        return cls(vision=vision, text=text,
                   scale_factor=d.get("scale_factor", cls.scale_factor),
                   image_token_id=d.get("image_token_id", cls.image_token_id),
                   tie_word_embeddings=d.get("tie_word_embeddings", cls.tie_word_embeddings),
                   model_type=model_type,
                   dtype=str(d.get("dtype") or d.get("torch_dtype") or cls.dtype),
                   linmu=mixer_config(d["linmu"]) if d.get("linmu") is not None else None)

    def to_hf_dict(self) -> dict:
        """The config.json transformers reads (5.x form), plus a "linmu" entry for a student."""
        architecture = {"smolvlm": "SmolVLMForConditionalGeneration",
                        "idefics3": "Idefics3ForConditionalGeneration"}[self.model_type]
        text = asdict(self.text)
        text.update(model_type="llama", tie_word_embeddings=self.tie_word_embeddings,
                    rope_parameters={"rope_theta": text.pop("rope_theta"), "rope_type": "default"})
        d = {"architectures": [architecture], "model_type": self.model_type, "dtype": self.dtype,
             "image_token_id": self.image_token_id, "scale_factor": self.scale_factor,
             "tie_word_embeddings": self.tie_word_embeddings,
             "vision_config": {**asdict(self.vision), "model_type": f"{self.model_type}_vision"},
             "text_config": text}
        if self.linmu is not None:
            d["linmu"] = asdict(self.linmu)
        return d


# ----------------------------------------------------------------------------------------------
# The vision encoder: SigLIP with Idefics3's variable-resolution position ids


class VisionEmbeddings(nn.Module):
    """Patchify with a stride-P convolution and add a learned position embedding per patch.

    The position table is for a full side x side patch grid. An image padded to the batch's size
    (pixel_attention_mask) has only h x w valid patches; their positions are spread over the whole
    table: row i gets bucket floor-like(i * (1/h) * side), computed exactly as transformers >= 4.57
    does (i * (1/h) in float32, clamped below 1, bucketized against the boundaries 1/side, 2/side, ...).
    transformers 4.55-4.56 computed i / h instead, whose rounding moves some patches one bucket over
    (issue 41190, fixed by PR 41374). Padding patches get position 0.
    """

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.side = cfg.image_size // cfg.patch_size
        self.patch_embedding = nn.Conv2d(cfg.num_channels, cfg.hidden_size, cfg.patch_size, stride=cfg.patch_size)
        self.position_embedding = nn.Embedding(self.side**2, cfg.hidden_size)

    def position_ids(self, patch_mask: Tensor) -> Tensor:
        """patch_mask: (N, h, w) True for valid patches (a top-left rectangle) -> position ids (N, h * w)."""
        boundaries = torch.arange(1 / self.side, 1.0, 1 / self.side, device=patch_mask.device)

        def buckets(valid: Tensor, length: int) -> Tensor:  # valid: (N,) valid patches along an axis -> (N, length)
            index = torch.arange(length, device=valid.device, dtype=torch.float32)
            fraction = (index[None, :] * (1.0 / valid)[:, None]).clamp(max=1.0 - 1e-6)
            return torch.bucketize(fraction, boundaries, right=True)

        n, h, w = patch_mask.shape
        rows = buckets(patch_mask[:, :, 0].sum(1), h)
        cols = buckets(patch_mask[:, 0, :].sum(1), w)
        ids = rows[:, :, None] * self.side + cols[:, None, :]  # (N, h, w)
        return torch.where(patch_mask, ids, 0).reshape(n, h * w)

    def forward(self, pixels: Tensor, patch_mask: Tensor) -> Tensor:
        """pixels: (N, C, H, W); patch_mask: (N, H/P, W/P) -> (N, S, Dv), S = (H/P) * (W/P) patches row-major."""
        x = self.patch_embedding(pixels).flatten(2).transpose(1, 2)  # (N, S, Dv)
        return x + self.position_embedding(self.position_ids(patch_mask))


class VisionAttention(nn.Module):
    """Bidirectional multi-head attention (with biases) over the valid patches of each image."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        """x: (N, S, Dv); key_mask: (N, 1, 1, S) True where a patch may be attended to, or None (all valid)."""
        n, s, d = x.shape
        q, k, v = (proj(x).view(n, s, self.num_heads, -1).transpose(1, 2)  # (N, Hv, S, Dv/Hv)
                   for proj in (self.q_proj, self.k_proj, self.v_proj))
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=key_mask)  # (N, Hv, S, Dv/Hv)
        return self.out_proj(y.transpose(1, 2).reshape(n, s, d))


class VisionMLP(nn.Module):
    """SigLIP's feed-forward: fc1, tanh-approximated GELU, fc2."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class VisionLayer(nn.Module):
    """Pre-norm transformer encoder layer (LayerNorm, attention, LayerNorm, MLP, residuals)."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = VisionAttention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = VisionMLP(cfg)

    def forward(self, x: Tensor, key_mask: Tensor | None) -> Tensor:
        x = x + self.self_attn(self.layer_norm1(x), key_mask)
        return x + self.mlp(self.layer_norm2(x))


class VisionTransformer(nn.Module):
    """The SigLIP encoder: embeddings, encoder.layers, post_layernorm."""

    def __init__(self, cfg: VisionConfig):
        super().__init__()
        self.embeddings = VisionEmbeddings(cfg)
        self.encoder = nn.ModuleDict({"layers": nn.ModuleList(VisionLayer(cfg) for _ in range(cfg.num_hidden_layers))})
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    def forward(self, pixels: Tensor, patch_mask: Tensor) -> Tensor:
        """pixels: (N, C, H, W); patch_mask: (N, H/P, W/P) -> patch features (N, S, Dv)."""
        x = self.embeddings(pixels, patch_mask)
        key_mask = None if patch_mask.all() else patch_mask.flatten(1)[:, None, None, :]  # (N, 1, 1, S)
        for layer in self.encoder.layers:
            x = layer(x, key_mask)
        return self.post_layernorm(x)


class Connector(nn.Module):
    """Pixel shuffle then a linear projection into the decoder width.

    Pixel shuffle folds each s x s block of the side x side patch grid into one token:
    patch (row p*s + a, col q*s + b) becomes channels (a, b) of token (p, q), i.e.
    n (p a q b) d -> n (p q) (a b d). Tokens stay row-major, so an image is a (side/s) x (side/s) grid.
    """

    def __init__(self, cfg: VLMConfig):
        super().__init__()
        self.scale_factor = cfg.scale_factor
        in_features = cfg.vision.hidden_size * cfg.scale_factor**2
        # nested to mirror the checkpoint key model.connector.modality_projection.proj.weight
        self.modality_projection = nn.ModuleDict({"proj": nn.Linear(in_features, cfg.text.hidden_size, bias=False)})

    def forward(self, x: Tensor) -> Tensor:
        """x: (N, S, Dv) patch features -> (N, S / s^2, D) decoder tokens."""
        n, seq, d = x.shape
        s = self.scale_factor
        g = math.isqrt(seq) // s  # tokens per side after the shuffle
        x = x.view(n, g, s, g, s, d).permute(0, 1, 3, 2, 4, 5)  # (N, p, q, a, b, Dv)
        x = x.reshape(n, g * g, s * s * d)  # (N, S / s^2, s^2 Dv)
        return self.modality_projection.proj(x)


# ----------------------------------------------------------------------------------------------
# The decoder: Llama (SmolLM2) with grouped-query attention


class RotaryEmbedding(nn.Module):
    """RoPE angles for absolute positions. Computed on the fly (no buffers), so dtype casts cannot round them."""

    def __init__(self, head_dim: int, theta: float):
        super().__init__()
        self.head_dim = head_dim
        self.theta = theta

    def forward(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        """positions: (B, L) -> (cos, sin), each (B, L, Dh) in float32, the two halves repeating."""
        exponents = torch.arange(0, self.head_dim, 2, device=positions.device, dtype=torch.float32) / self.head_dim
        inv_freq = 1.0 / self.theta**exponents  # (Dh/2,)
        angles = positions[..., None].float() * inv_freq  # (B, L, Dh/2)
        angles = torch.cat((angles, angles), dim=-1)  # (B, L, Dh)
        return angles.cos(), angles.sin()


class Attention(AttentionProjections):
    """The teacher's causal grouped-query self-attention with RoPE (the layer M-MATE replaces).

    Mixer contract, shared with M-MATE: y, cache = mixer(x, plan) reads the whole prompt;
    y = mixer.step(x, rope, position, cache) reads one new token and updates the cache in place.
    """

    def __init__(self, cfg: TextConfig):
        super().__init__(cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)

    def forward(self, x: Tensor, plan: PromptPlan) -> tuple[Tensor, KVCache]:
        """x: (B, L, D) -> (y (B, L, D), the keys and values of all L tokens with room for plan.new_tokens more)."""
        b, length, _ = x.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x, *plan.rope))  # (B, H, L, Dh), (B, Hkv, L, Dh)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
        room = lambda t: F.pad(t, (0, 0, 0, plan.new_tokens)) if plan.new_tokens else t  # no copy when none is asked
        cache = KVCache(room(k), room(v))  # (B, Hkv, L + new, Dh)
        return self.o_proj(y.transpose(1, 2).flatten(2)), cache

    def step(self, x: Tensor, rope: tuple[Tensor, Tensor], position: Tensor, cache: KVCache) -> Tensor:
        """One new token at `position` ((1,) tensor): x (B, 1, D) -> (B, 1, D), its key and value written in place."""
        q, k, v = self.qkv(x, *rope)
        cache.k.index_copy_(2, position, k.transpose(1, 2))
        cache.v.index_copy_(2, position, v.transpose(1, 2))
        visible = torch.arange(cache.k.shape[2], device=x.device) <= position  # the slots written so far
        return self.o_proj(cached_attention(q, cache, visible))


class MLP(nn.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: TextConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    """Pre-norm decoder layer: h += mixer(norm(h)); h += mlp(norm(h)).

    The mixer (still named self_attn, like the checkpoint key) is the teacher's Attention, or in
    the LinMU student an M-MATE layer (what differs from layer to layer is in its PromptPlan).
    """

    def __init__(self, cfg: TextConfig, linmu: MixerConfig | None):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg) if linmu is None else MMATE(
            cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, linmu, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h: Tensor, plan: PromptPlan) -> tuple[Tensor, object]:
        """h: (B, L, D) residual stream of the whole prompt -> (h, the mixer's decoding cache)."""
        y, cache = self.self_attn(per_token(self.input_layernorm, h), plan)
        return per_token(self._feed_forward, h, y), cache

    def step(self, h: Tensor, rope: tuple[Tensor, Tensor], position: Tensor, cache) -> Tensor:
        """One new token: h (B, 1, D) -> (B, 1, D), the mixer's cache updated in place."""
        return self._feed_forward(h, self.self_attn.step(self.input_layernorm(h), rope, position, cache))

    def _feed_forward(self, h: Tensor, y: Tensor) -> Tensor:
        """The rest of the layer, token by token: the mixer's output y joins the residual stream h, then the MLP."""
        h = h + y
        return h + self.mlp(self.post_attention_layernorm(h))


class TextModel(nn.Module):
    """The decoder stack: embed_tokens, layers, final norm, and the RoPE angles they share.

    gradient_checkpointing: recompute each layer in the backward pass instead of storing its
    activations (for long videos in training; set by distill.py).
    """

    def __init__(self, cfg: TextConfig, linmu: MixerConfig | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, linmu) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.mixer = linmu
        self.gradient_checkpointing = False

    def plan(self, layout: TokenLayout, dtype: torch.dtype, new_tokens: int = 0) -> list[PromptPlan]:
        """Everything the layers need from the prompt's layout, computed once before them: a plan per layer."""
        rope = tuple(t.to(dtype) for t in self.rotary(layout.positions))
        return PromptPlan.build(layout, rope, self.mixer, len(self.layers), new_tokens)

    def forward(self, inputs_embeds: Tensor, layout: TokenLayout, new_tokens: int = 0,
                output_hidden_states: bool = False) -> tuple[Tensor, list, list[Tensor] | None]:
        """inputs_embeds: (B, L, D), the whole prompt -> (final-normed hidden (B, L, D), one decoding
        cache per layer with room for new_tokens more tokens, hidden states).

        The hidden states (if asked) are the embeddings then the residual stream after each layer
        (num_layers + 1 tensors, all before the final norm; transformers' last entry is after it).
        """
        h = inputs_embeds
        plans = self.plan(layout, h.dtype, new_tokens)
        hidden_states = [h] if output_hidden_states else None
        caches = []
        for layer, plan in zip(self.layers, plans):
            if self.gradient_checkpointing and self.training:
                h, cache = torch.utils.checkpoint.checkpoint(layer, h, plan, use_reentrant=False)
            else:
                h, cache = layer(h, plan)
            caches.append(cache)
            if output_hidden_states:
                hidden_states.append(h)
        return self.norm(h), caches, hidden_states

    def step(self, h: Tensor, position: Tensor, caches: list) -> Tensor:
        """One new token per sequence, all at `position` ((1,) long tensor): h (B, 1, D) -> final-normed (B, 1, D).
        Fixed shapes and no host synchronisation; the caches are updated in place."""
        rope = tuple(t.to(h.dtype) for t in self.rotary(position.expand(h.shape[0], 1)))
        for layer, cache in zip(self.layers, caches):
            h = layer.step(h, rope, position, cache)
        return self.norm(h)


# ----------------------------------------------------------------------------------------------
# The whole model


@dataclass
class VLMOutput:
    """logits: (B, L, V); caches: one decoding cache per decoder layer; hidden_states: see TextModel.forward."""

    logits: Tensor
    caches: list
    hidden_states: list[Tensor] | None = None


class VLM(nn.Module):
    """SmolVLM2: vision encoder + connector + decoder + lm_head, named like the Hub checkpoint.

    Images reach the decoder as image_seq_len placeholder tokens (config.image_token_id) each; their
    embeddings are replaced by the connector's output, image by image, in (batch, sequence) order.
    """

    def __init__(self, config: VLMConfig):
        super().__init__()
        self.config = config
        self.model = nn.ModuleDict({"vision_model": VisionTransformer(config.vision),
                                    "connector": Connector(config),
                                    "text_model": TextModel(config.text, config.linmu)})
        self.lm_head = nn.Linear(config.text.hidden_size, config.text.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.text_model.embed_tokens.weight

    def encode_images(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None) -> Tensor:
        """pixel_values: (B, N, C, H, W) or (N, C, H, W); pixel_attention_mask: the same without C, True on real pixels.

        Returns (n_real_images, image_seq_len, D): all-zero images (batch padding) are dropped.
        """
        if pixel_values.dim() == 4:
            pixel_values = pixel_values[None]
            pixel_attention_mask = pixel_attention_mask[None] if pixel_attention_mask is not None else None
        images = pixel_values.flatten(0, 1)  # (B N, C, H, W)
        real = images.flatten(1).ne(0).any(1)
        images = images[real].to(self.lm_head.weight.dtype)
        n, _, height, width = images.shape
        p = self.config.vision.patch_size
        if pixel_attention_mask is None:
            patch_mask = torch.ones(n, height // p, width // p, dtype=torch.bool, device=images.device)
        else:
            mask = pixel_attention_mask.flatten(0, 1)[real].bool()[:, : height // p * p, : width // p * p]
            patches = mask.unflatten(1, (height // p, p)).unflatten(3, (width // p, p))  # (n, H/P, P, W/P, P)
            patch_mask = patches.any(4).any(2)  # a patch is valid if any of its pixels is
        return self.model.connector(self.model.vision_model(images, patch_mask))

    def embed(self, input_ids: Tensor, image_features: Tensor | None) -> Tensor:
        """input_ids: (B, L); image_features: (n_images, T, D) -> inputs_embeds (B, L, D)."""
        h = self.model.text_model.embed_tokens(input_ids)
        is_image = input_ids == self.config.image_token_id
        n_features = 0 if image_features is None else image_features.shape[0] * image_features.shape[1]
        if int(is_image.sum()) != n_features:
            raise ValueError(f"input_ids hold {int(is_image.sum())} image tokens but the images give {n_features} "
                             f"features ({self.config.image_seq_len} per image): pass exactly the processor's images")
        if n_features:
            h = h.masked_scatter(is_image[..., None], image_features.to(h.dtype))
        return h

    def default_grids(self, input_ids: Tensor) -> list[list[tuple[int, int, int]]]:
        """The grids for images when the caller gives none: each block of image_seq_len image tokens is
        one (1, side, side) image, side = sqrt(image_seq_len). Videos must pass (frames, rows, cols) grids."""
        per_image = self.config.image_seq_len
        side = math.isqrt(per_image)
        grids = []
        for count in (input_ids == self.config.image_token_id).sum(1).tolist():
            if count % per_image:
                raise ValueError(f"a sequence has {count} image tokens, not a multiple of {per_image} per image: "
                                 "pass grids explicitly")
            grids.append([(1, side, side)] * (count // per_image))
        return grids

    def forward(self, input_ids: Tensor, pixel_values: Tensor | None = None, pixel_attention_mask: Tensor | None = None,
                grids: list[list[tuple[int, int, int]]] | None = None, new_tokens: int = 0,
                output_hidden_states: bool = False) -> VLMOutput:
        """A whole prompt, input_ids (B, L) -> logits (B, L, V) and decoding caches with room for new_tokens more."""
        features = self.encode_images(pixel_values, pixel_attention_mask) if pixel_values is not None else None
        h = self.embed(input_ids, features)
        grids = grids if grids is not None else self.default_grids(input_ids)
        layout = TokenLayout.build(input_ids, self.config.image_token_id, grids)
        h, caches, hidden_states = self.model.text_model(h, layout, new_tokens, output_hidden_states)
        return VLMOutput(self.lm_head(h), caches, hidden_states)

    @torch.no_grad()  # else the caches, written from trainable weights, would join the autograd graph
    def step(self, token: Tensor, position: Tensor, caches: list) -> Tensor:
        """One decoding step: text tokens (B,) at `position` ((1,) long tensor, the same for every
        sequence) -> next-token logits (B, V). The caches, from forward(..., new_tokens=N), are
        updated in place; the shapes are fixed and nothing waits on the host, so a step can be
        recorded as a CUDA graph (see decoder)."""
        h = self.model.text_model.embed_tokens(token[:, None])  # (B, 1, D)
        return self.lm_head(self.model.text_model.step(h, position, caches))[:, 0]


def convert_to_linmu(teacher: VLM, mixer: MixerConfig | None = None) -> VLM:
    """The LinMU student of a teacher: a copy whose every decoder self-attention is replaced by an
    M-MATE layer initialized from it (MMATE.from_attention); the vision encoder, connector, MLPs, norms, embeddings and head are the teacher's."""
    mixer = mixer or MixerConfig()
    student = copy.deepcopy(teacher)
    student.config = replace(teacher.config, linmu=mixer)
    text = teacher.config.text
    student.model.text_model.mixer = mixer
    for layer in student.model.text_model.layers:
        layer.self_attn = MMATE.from_attention(layer.self_attn, text.hidden_size, mixer, text.rms_norm_eps)
    return student


# ----------------------------------------------------------------------------------------------
# Generation: prefill once, then one cheap step per token


def next_token(logits: Tensor, temperature: float = 0.0, top_p: float = 1.0,
               generator: torch.Generator | None = None) -> Tensor:
    """logits (B, V) -> token ids (B,): greedy at temperature 0, else nucleus (top-p) sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(-1) - sorted_probs > top_p  # tokens past the nucleus
    sorted_probs = sorted_probs.masked_fill(outside, 0)
    choice = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, choice).squeeze(-1)


class CUDAGraphStep:
    """A decoding step (token, position) -> logits recorded once as a CUDA graph, then replayed.

    A decoding step is hundreds of small kernels; launched one by one from Python, the GPU waits
    on the host for each. The fixed-size caches (written in place) and the position as a tensor
    make the step a function of fixed buffers, which a CUDA graph replays with one launch.

    Why torch.cuda.CUDAGraph and not torch.compile(mode="reduce-overhead"): the graph records the
    very code that runs eagerly (compiled or not: see compile_model), it is a dozen lines to read,
    and reduce-overhead declines to graph a function that writes into its inputs, which is what
    a decoding step does to its caches.

    The first call runs the step for real on a side stream (so that cuBLAS and the allocator set
    up their workspaces outside the capture), then records the graph without running it. Every
    call returns the same logits buffer, overwritten by the next call.
    """

    def __init__(self, step):
        self.step = step
        self.graph = None

    def __call__(self, token: Tensor, position: Tensor) -> Tensor:
        if self.graph is not None:
            self.token.copy_(token)
            self.position.copy_(position)
            self.graph.replay()
            return self.logits
        self.token, self.position = token.clone(), position.clone()
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            logits = self.step(self.token, self.position)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self.step(self.token, self.position)
        return logits


def decoder(model: VLM, caches: list):
    """model.step on these caches as a function (token (B,), position (1,)) -> logits (B, V):
    eager on the CPU (the reference), a CUDA graph on CUDA."""
    step = lambda token, position: model.step(token, position, caches)
    return CUDAGraphStep(step) if next(model.parameters()).device.type == "cuda" else step


def compile_model(model: VLM, backend: str = "inductor") -> None:
    """torch.compile what runs most: every vision and decoder layer, and each decoder layer's decoding step.

    Each is compiled whole (fullgraph: a graph break is an error) with dynamic shapes, so one
    compilation serves prompts of every length: a layer reads only tensors and the PromptPlan,
    and never waits on the host. The layers of a model share their compiled code, since what
    differs between them is data (PromptPlan): compiling costs seconds per graph, not per layer. A
    student's prefill has a graph for visual prompts with and without a Rotary Major-Scan order,
    and one for text-only prompts; every step one. The decoding step is compiled layer by layer for
    that reason (compiled whole, 30 layers' steps made one graph that took a minute and more to
    compile on a CPU). On CUDA the step around them is then recorded as a CUDA graph (decoder).
    On a CPU, whose pieces (Tuning) are a loop that dynamo unrolls, each kind of prompt has a graph
    per number of pieces, and dynamo allows 8 graphs per function: a student's visual prompts (two
    kinds) compile up to four pieces (8,192 tokens), fewer once text-only prompts come too, and
    then fail (fullgraph).
    backend: torch.compile's (the tests trace the same graphs with "aot_eager", which generates no code)."""
    # No duck sizing: sizes equal in the first prompt compiled (an image's 16-token Swin windows and
    # the 16-query text blocks) would be assumed equal from then on, and any other prompt recompile.
    torch.fx.experimental._config.use_duck_shape = False
    for layer in [*model.model.vision_model.encoder.layers, *model.model.text_model.layers]:
        layer.compile(fullgraph=True, dynamic=True, backend=backend)
    for layer in model.model.text_model.layers:
        layer.step = torch.compile(layer.step, fullgraph=True, dynamic=True, backend=backend)


@torch.no_grad()
def generate(model: VLM, input_ids: Tensor, pixel_values: Tensor | None = None,
             pixel_attention_mask: Tensor | None = None, grids: list | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
             generator: torch.Generator | None = None) -> Tensor:
    """Continue a batch of equal-length prompts (no padding) -> new token ids (B, <= max_new_tokens).

    The prompt, images and video included, is read once (prefill); each new token is then one step
    on the caches (a CUDA graph on CUDA): the teacher's KV cache, allocated for the prompt and the
    new tokens, the LinMU student's Flex-MA state and Local-Swin ring, whose size does not depend
    on the context. Sequences that produced eos_token_id keep producing it until all have.
    """
    out = model(input_ids, pixel_values, pixel_attention_mask, grids, new_tokens=max_new_tokens)
    step = decoder(model, out.caches)
    position = torch.tensor([input_ids.shape[1]], device=input_ids.device)
    logits = out.logits[:, -1]
    finished = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    tokens = []
    for i in range(max_new_tokens):
        token = next_token(logits, temperature, top_p, generator)
        if eos_token_id is not None:
            token = token.masked_fill(finished, eos_token_id)
            finished |= token == eos_token_id
        tokens.append(token)
        if i + 1 == max_new_tokens or (eos_token_id is not None and finished.all()):  # waits on the device
            break
        logits = step(token, position)
        position += 1
    return torch.stack(tokens, dim=1)


# ----------------------------------------------------------------------------------------------
# Loading and saving Hub-layout checkpoints (config.json + safetensors)


class InputError(ValueError):
    """A mistake in what the user gave: a flag's value, a checkpoint's contents, a data file, an image.

    Its message says what is wrong and what to do. The commands end on it, and on an OSError (a
    missing file, no network), with that one line (see `user_errors`).
    """


CHECKPOINT_PATTERNS = ["config.json", "*.safetensors", "model.safetensors.index.json", "generation_config.json",
                       "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
                       "vocab.json", "merges.txt", "preprocessor_config.json", "processor_config.json",
                       "video_preprocessor_config.json", "chat_template.json", "chat_template.jinja"]


def resolve_checkpoint(model_id_or_dir: str | os.PathLike) -> Path:
    """A local checkpoint directory as is, otherwise a Hub repo id ("owner/name") downloaded to the HF cache."""
    path = Path(model_id_or_dir).expanduser()
    name = str(model_id_or_dir)
    if path.exists() or name.startswith((".", "/", "~")) or name.count("/") != 1:  # not an "owner/name" repo id
        if not path.is_dir():
            raise FileNotFoundError(f"checkpoint directory {path} does not exist: give a directory holding "
                                    "config.json and *.safetensors, or a Hub repo id (owner/name)")
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"{path} has no config.json: point at a checkpoint directory saved by save_model "
                                    "or transformers' save_pretrained")
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import (GatedRepoError, HfHubHTTPError, HFValidationError, LocalEntryNotFoundError,
                                       RepositoryNotFoundError, RevisionNotFoundError)
    try:
        return Path(snapshot_download(name, allow_patterns=CHECKPOINT_PATTERNS))
    except GatedRepoError:
        raise PermissionError(f"Hub repo {name} is gated: accept its terms on huggingface.co and log in "
                              "with `hf auth login` (or set HF_TOKEN)") from None
    except (RepositoryNotFoundError, RevisionNotFoundError, HFValidationError) as err:
        raise FileNotFoundError(f"{name} is neither a local directory nor a Hub repo ({type(err).__name__}): check "
                                "the path or repo id, or log in with `hf auth login` if the repo is private") from None
    except LocalEntryNotFoundError:
        raise ConnectionError(f"cannot download {name}: offline and not in the Hugging Face cache; connect once "
                              "(unset HF_HUB_OFFLINE) or pass a local checkpoint directory") from None
    except HfHubHTTPError as err:
        raise ConnectionError(f"downloading {name} failed ({type(err).__name__}: {str(err).splitlines()[0]}): retry, "
                              "or pass a local checkpoint directory") from None


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint directory: model.safetensors, or the shards its index names."""
    if (path / "model.safetensors").is_file():
        return [path / "model.safetensors"]
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (ValueError, KeyError, AttributeError) as error:
            raise InputError(f"{index} is not a safetensors index ({type(error).__name__}: {error}): "
                             "download or save the checkpoint again") from None
        for name in names:
            if not (path / name).is_file():
                raise FileNotFoundError(f"{path / name}, a shard {index.name} names, does not exist: "
                                        "download or save the checkpoint again")
        return [path / name for name in names]
    raise FileNotFoundError(f"{path} has neither model.safetensors nor model.safetensors.index.json "
                            "(only safetensors checkpoints are supported)")


def read_config(file: Path, expect: str | None = None) -> VLMConfig:
    """The VLMConfig of a config.json (a checkpoint directory's, or one such as configs/smolvlm2-256m.json).

    expect: "teacher" (a SmolVLM2 model, no "linmu" entry), "student" (a LinMU student) or None (either).
    InputError when the file is not JSON, describes a model this code does not implement, or is
    the other kind.
    """
    if not file.is_file():
        raise FileNotFoundError(f"{file} does not exist: give a SmolVLM2 config.json or a checkpoint directory")
    try:
        config = VLMConfig.from_hf_dict(json.loads(file.read_text()))
    except json.JSONDecodeError as error:
        raise InputError(f"{file} is not JSON ({error}): download or save the checkpoint again") from None
    except (ValueError, TypeError, AttributeError) as error:  # a model this code does not implement, or no config
        raise InputError(f"{file}: {error}") from None
    if expect is not None and (expect == "student") != (config.linmu is not None):
        if expect == "teacher":
            raise InputError(f"{file} describes a LinMU student (it has a \"linmu\" entry) where a SmolVLM2 teacher "
                             "is needed: give the SmolVLM2 checkpoint the student was converted from")
        raise InputError(f"{file} describes a SmolVLM2 teacher (it has no \"linmu\" entry) where a LinMU student is "
                         f"needed: convert it first with `python convert.py --model {file.parent}`")
    return config


def checkpoint_tensors(path: Path) -> dict[str, Path]:
    """Where each tensor of a checkpoint directory is stored: its name -> its safetensors file.

    Reads the files' headers only; InputError for one that is not readable (truncated or corrupt).
    """
    from safetensors import SafetensorError, safe_open

    where = {}
    for file in checkpoint_files(path):
        try:
            with safe_open(file, framework="pt") as f:
                where.update((key, file) for key in f.keys())
        except SafetensorError as error:
            raise InputError(f"{file} is not a readable safetensors file ({error}; truncated or corrupt?): "
                             "download or save the checkpoint again") from None
    return where


def check_checkpoint(path: Path, expect: str | None = None) -> VLMConfig:
    """Check what can be checked of a checkpoint directory without loading its weights (its config.json,
    the kind `expect`ed as in read_config, every safetensors header) and return its config. Commands
    that load two checkpoints check both first, so that a mistake in either costs no loading."""
    config = read_config(path / "config.json", expect)
    checkpoint_tensors(path)
    return config


def load_model(model_id_or_dir: str | os.PathLike, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32) -> VLM:
    """Build the model a checkpoint's config.json describes and fill every parameter from its safetensors.

    Strict: every checkpoint tensor must be used and every parameter filled (a tied lm_head is the
    embedding), else InputError, as for an unreadable config.json or safetensors file. A config with
    a "linmu" entry builds the LinMU student instead.
    """
    from safetensors import safe_open
    from tqdm import tqdm

    path = resolve_checkpoint(model_id_or_dir)
    config = read_config(path / "config.json")
    where = checkpoint_tensors(path)
    with torch.device(device):
        model = VLM(config)
    model.to(dtype)
    params = model.state_dict(keep_vars=True)
    if config.tie_word_embeddings:
        params.pop("lm_head.weight")
    missing, unexpected = sorted(params.keys() - where.keys()), sorted(where.keys() - params.keys())
    if missing or unexpected:
        raise InputError(f"checkpoint {path} does not match the model its config.json describes: {len(missing)} "
                         f"missing keys {missing[:3]}, {len(unexpected)} unexpected keys {unexpected[:3]}")
    with torch.no_grad(), tqdm(total=len(where), desc="loading weights", unit="tensor") as bar:
        for file in dict.fromkeys(where.values()):
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    if tensor.shape != params[key].shape:
                        raise InputError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape "
                                         f"{tuple(params[key].shape)} in {file}")
                    params[key].copy_(tensor)
                    bar.update()
    return model.eval()


PROCESSOR_FILES = [name for name in CHECKPOINT_PATTERNS if name != "config.json" and "safetensors" not in name]


def save_model(model: VLM, out_dir: str | os.PathLike, source: str | os.PathLike | None = None,
               extra: dict[str, object] | None = None) -> Path:
    """Write a Hub-layout checkpoint directory: config.json and model.safetensors (a tied lm_head
    stored once), the tokenizer and processor files of the checkpoint directory `source`, and each
    `extra` object under its file name (torch.save). Everything goes to a temporary directory that
    then replaces out_dir, so an interruption never leaves a half-written checkpoint."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    tmp, old = out.with_name(f".{out.name}.tmp{os.getpid()}"), out.with_name(f".{out.name}.old{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()
             if not (k == "lm_head.weight" and model.config.tie_word_embeddings)}
    config = model.config.to_hf_dict()
    config["dtype"] = str(next(iter(state.values())).dtype).removeprefix("torch.")
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    for name in PROCESSOR_FILES if source is not None else []:
        if (Path(source) / name).is_file():
            shutil.copy2(Path(source) / name, tmp / name)
    for name, obj in (extra or {}).items():
        torch.save(obj, tmp / name)
    if out.exists():
        os.replace(out, old)
    os.replace(tmp, out)
    shutil.rmtree(old, ignore_errors=True)
    return out


def write_json(path: str | Path, payload: dict) -> None:
    """Write results so far, atomically: an interrupted run leaves the last complete file (bench.py, toy.py)."""
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(payload, indent=2) + "\n")
    os.replace(tmp, path)


# ----------------------------------------------------------------------------------------------
# Command line: describe an image or a video with a teacher or a LinMU student checkpoint


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


@contextlib.contextmanager
def user_errors(prog: str, *more: type[Exception]):
    """The four commands' error convention, as a decorator of a command's main (or around a block).

    An InputError, an OSError (a missing file, no network) or one of `more` ends the program with one
    line, `prog: error: <what is wrong, and what to do>`, on stderr and exit status 2, as argparse ends
    a bad flag. Any other exception is a bug and keeps its traceback.
    """
    try:
        yield
    except (InputError, OSError, *more) as error:
        print(f"{prog}: error: {' '.join(str(error).splitlines())}", file=sys.stderr)
        raise SystemExit(2) from None


def check_device(name: str) -> torch.device:
    """A --device value as a torch.device; InputError when this machine has no such device."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    accelerator = torch.accelerator.current_accelerator(check_available=True)
    count = torch.accelerator.device_count() if accelerator is not None else 0
    if device is None or device.type != "cpu" and (accelerator is None or device.type != accelerator.type
                                                   or (device.index or 0) >= count):
        here = "cpu" if accelerator is None else f"cpu, {accelerator.type} or {accelerator.type}:N for N < {count}"
        raise InputError(f"--device {name}: no such device on this machine; use {here}")
    return device


def check_bounds(args: argparse.Namespace, at_least: dict[str, float] | None = None,
                 above: dict[str, float] | None = None) -> None:
    """InputError naming the first flag (an attribute of args) whose value is below its bound:
    `at_least` bounds are allowed values, `above` bounds are not. A None value (unset) passes."""
    for bounds, words, allowed in ((at_least or {}, "at least", lambda value, bound: value >= bound),
                                   (above or {}, "more than", lambda value, bound: value > bound)):
        for name, bound in bounds.items():
            value = getattr(args, name)
            if value is not None and not allowed(value, bound):
                raise InputError(f"--{name.replace('_', '-')} must be {words} {bound}, not {value}")


@user_errors("linmu.py")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="linmu.py",
        description="Generate an answer about images or a video with a SmolVLM2 teacher or its LinMU student "
                    "(any checkpoint load_model reads: a Hub repo id, convert.py's output, distill.py's output).")
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub repo id (owner/name)")
    parser.add_argument("--image", action="append", default=[], help="an image file; repeat for several images")
    parser.add_argument("--video", help="a video: a folder of frame images (one per second) or a file (needs torchcodec)")
    parser.add_argument("--prompt", default="Describe this.", help="the question or instruction (default: %(default)s)")
    parser.add_argument("--max-frames", type=int, default=64,
                        help="most video frames sampled at 1 fps; LinMU's point is that more is affordable (default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="longest answer in tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when temperature > 0 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--device", default=default_device(), help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args(argv)
    check_device(args.device)
    check_bounds(args, at_least={"max_frames": 1, "max_new_tokens": 1, "temperature": 0}, above={"top_p": 0})
    if args.top_p > 1:
        raise InputError(f"--top-p must be at most 1, not {args.top_p}")

    from processing import Processor, load_video

    path = resolve_checkpoint(args.model)
    processor = Processor.from_pretrained(path)  # the inputs first: a mistake there costs no weight loading
    content = [{"type": "image"} for _ in args.image] + ([{"type": "video"}] if args.video else [])
    messages = [{"role": "user", "content": content + [{"type": "text", "text": args.prompt}]}]
    video = load_video(args.video, fps=1.0, max_frames=args.max_frames) if args.video else None
    batch = processor(messages, images=args.image, video=video)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model = load_model(path, args.device, dtype)
    pixels = batch["pixel_values"].to(args.device) if len(batch["pixel_values"]) else None
    ids = generate(model, batch["input_ids"].to(args.device), pixels, grids=batch["grids"],
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   eos_token_id=processor.eos_token_id,
                   generator=torch.Generator(args.device).manual_seed(args.seed))
    print(processor.decode(ids[0]).strip())


if __name__ == "__main__":
    main()
