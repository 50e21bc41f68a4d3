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
from dataclasses import dataclass, field

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
    _memo: dict = field(default_factory=dict, repr=False)

    def memo(self, key, compute):
        """compute() once per layout (window partitions are shared by all layers)."""
        if key not in self._memo:
            self._memo[key] = compute()
        return self._memo[key]

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


@dataclass
class KVCache:
    """Keys and values kept for decoding: (B, heads, T, Dh), after RoPE."""

    k: Tensor
    v: Tensor


# ----------------------------------------------------------------------------------------------
# 1. The chunked SSD scan (Mamba2's state space duality; LinMU Sec. 3, Flex-MA's engine)


def segment_sum(a: Tensor) -> Tensor:
    """out[..., i, j] = a[..., j+1] + ... + a[..., i] for i >= j, and -inf for i < j.

    Built as a cumulative sum of a masked copy of a, never as a difference of two long partial
    sums, so it stays exact for long chunks (ssd_minimal's stable form). a: (..., T) -> (..., T, T).
    """
    T = a.size(-1)
    a = a[..., None].expand(*a.shape, T)  # (..., T, T), a[..., i, j] = a_i
    strictly_lower = torch.ones(T, T, dtype=torch.bool, device=a.device).tril(-1)
    sums = a.masked_fill(~strictly_lower, 0).cumsum(dim=-2)
    return sums.masked_fill(~strictly_lower.logical_or(torch.eye(T, dtype=torch.bool, device=a.device)), -math.inf)


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int,
             initial_state: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The selective-SSM recurrence, computed chunk by chunk (Mamba2's SSD algorithm).

        h_t = exp(dt_t * A) * h_{t-1} + dt_t * (x_t outer B_t),    y_t = h_t . C_t

    x: (B, L, H, P); dt: (B, L, H), positive; A: (H,), negative; B, C: (B, L, G, N), H a multiple
    of G; initial_state: (B, H, P, N) or None (zeros). Returns y (B, L, H, P) in x's dtype and the
    final state (B, H, P, N) in the float32 (float64 for float64 inputs) the scan accumulates in.

    Four steps per chunk of Q tokens: (1) outputs from inputs inside the chunk, a Q x Q masked
    matmul; (2) each chunk's state from its own inputs; (3) a recurrence carrying the state from
    chunk to chunk; (4) outputs from the carried-in state. The cost is O(L Q (N + P) H): linear in L.
    """
    batch, length, heads, head_dim = x.shape
    if heads % B.shape[2]:
        raise ValueError(f"ssd_scan: {heads} heads is not a multiple of {B.shape[2]} B/C groups")
    out_dtype = x.dtype
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    pad = -length % chunk_size  # padded steps have dt = 0: no input and no decay, state unchanged
    chunks = (length + pad) // chunk_size

    def chunked(t: Tensor) -> Tensor:  # (B, L, H, ...) -> (B, H, c, Q, ...), one copy
        t = F.pad(t.to(acc), (0, 0) * (t.dim() - 2) + (0, pad))
        return t.reshape(batch, chunks, chunk_size, *t.shape[2:]).movedim(3, 1).contiguous()

    if heads != B.shape[2]:
        B, C = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (B, C))
    x, dt, B, C = chunked(x), chunked(dt), chunked(B), chunked(C)  # (B, H, c, Q, P), (B, H, c, Q), (B, H, c, Q, N)
    x_dt = x * dt[..., None]
    log_decay = dt * A.to(acc)[:, None, None]  # (B, H, c, Q)
    cum = log_decay.cumsum(dim=-1)

    # 1. Within each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(a_{j+1} + ... + a_i) dt_j x_j
    scores = (C @ B.transpose(-1, -2)) * segment_sum(log_decay).exp()  # (B, H, c, Q, Q)
    y = scores @ x_dt  # (B, H, c, Q, P)

    # 2. Each chunk's final state from its own inputs, decayed to the chunk's end
    to_end = (cum[..., -1:] - cum).exp()  # (B, H, c, Q)
    chunk_states = x_dt.transpose(-1, -2) @ (B * to_end[..., None])  # (B, H, c, P, N)

    # 3. Carry the state across chunks: entering[:, :, c] is the state before chunk c
    chunk_decay = cum[..., -1].exp().movedim(2, 0)[..., None, None]  # (c, B, H, 1, 1)
    chunk_states = chunk_states.movedim(2, 0).contiguous()  # (c, B, H, P, N)
    state = (torch.zeros(batch, heads, head_dim, B.shape[-1], dtype=acc, device=x.device)
             if initial_state is None else initial_state.to(acc))
    entering = []
    for c in range(chunks):
        entering.append(state)
        state = torch.addcmul(chunk_states[c], chunk_decay[c], state)
    entering = torch.stack(entering, dim=2)  # (B, H, c, P, N)

    # 4. Outputs from the carried-in state, decayed to each position
    y = y + (C * cum.exp()[..., None]) @ entering.transpose(-1, -2)  # (B, H, c, Q, P)
    y = y.reshape(batch, heads, chunks * chunk_size, head_dim)[:, :, :length].transpose(1, 2)  # (B, L, H, P)
    return y.to(out_dtype), state


# ----------------------------------------------------------------------------------------------
# 2. Flex-MA: the bidirectional Mamba2-style global branch (LinMU Sec. 3.2)


@dataclass
class FlexMACache:
    """Flex-MA's decoding state: the last conv_kernel - 1 conv inputs (B, C, K-1) and the SSM state (B, H, P, N)."""

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
        subtracted (Hydra drops both diagonals through a one-step shift and adds a D term; keeping
        the forward diagonal keeps text tokens exactly Mamba2);
      * D x_t is added once, from the forward features;
      * heads = attention heads, head dim P = attention head dim, one B/C group per head and state
        size N = head dim, so that the attention weights map onto it (see MMATE.from_attention);
      * the gate is norm(y * silu(z)), a per-head RMSNorm (the normalizer softmax attention has and
        a linear scan lacks), and z = W_z u + z_bias: the bias (not in Mamba2) lets the gate start as
        a constant, W_z = 0, instead of zero or noise.
    """

    def __init__(self, d_model: int, heads: int, head_dim: int, cfg: MixerConfig, eps: float = 1e-5):
        super().__init__()
        self.heads, self.head_dim, self.d_state, self.chunk_size = heads, head_dim, head_dim, cfg.chunk_size
        self.d_inner = heads * head_dim
        self.conv_dim = self.d_inner + 2 * heads * self.d_state  # x, B, C
        self.in_proj = nn.Linear(d_model, self.d_inner + self.conv_dim + heads, bias=False)  # [z | x | B | C | dt]
        self.z_bias = nn.Parameter(torch.ones(self.d_inner))
        self.conv_forward = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim)
        self.conv_backward = nn.Conv1d(self.conv_dim, self.conv_dim, cfg.conv_kernel, groups=self.conv_dim)
        # Mamba2's defaults: dt log-uniform in [1e-3, 1e-1] (stored through softplus's inverse), A in [1, 16].
        dt = torch.exp(torch.empty(heads).uniform_(math.log(1e-3), math.log(1e-1)))
        self.dt_bias = nn.Parameter(dt + torch.log(-torch.expm1(-dt)))
        self.A_log = nn.Parameter(torch.empty(heads).uniform_(1, 16).log())
        self.D = nn.Parameter(torch.zeros(heads))
        self.norm = RMSNorm(head_dim, eps)
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)

    def _split(self, u: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """u: (B, L, D) -> z (B, L, H*P), xBC (B, L, conv_dim) before the convolution, dt (B, L, H)."""
        return self.in_proj(u).split([self.d_inner, self.conv_dim, self.heads], dim=-1)

    def _features(self, xBC: Tensor, conv: nn.Conv1d) -> tuple[Tensor, Tensor, Tensor]:
        """Causal depthwise conv + SiLU, then split: (B, L, conv_dim) -> x (B, L, H, P), B and C (B, L, H, N)."""
        length = xBC.shape[1]
        xBC = F.silu(conv(F.pad(xBC.transpose(1, 2), (conv.kernel_size[0] - 1, 0))).transpose(1, 2))
        x, B, C = xBC.split([self.d_inner, self.d_inner, self.d_inner], dim=-1)
        return (x.reshape(-1, length, self.heads, self.head_dim),
                B.reshape(-1, length, self.heads, self.d_state), C.reshape(-1, length, self.heads, self.d_state))

    def _output(self, y: Tensor, z: Tensor) -> Tensor:
        """Gated per-head RMSNorm and output projection: y (B, L, H, P), z (B, L, H*P) -> (B, L, D)."""
        gate = F.silu(z + self.z_bias).unflatten(-1, (self.heads, self.head_dim))
        return self.out_proj(self.norm(y * gate).flatten(2))

    def forward(self, u: Tensor, visual: Tensor) -> tuple[Tensor, FlexMACache]:
        """Full-sequence pass. u: (B, L, D); visual: (B, L) bool. Returns (B, L, D) and the decoding cache."""
        z, xBC, dt = self._split(u)
        A = -self.A_log.exp()
        dt = F.softplus(dt + self.dt_bias)  # (B, L, H)
        x, B, C = self._features(xBC, self.conv_forward)
        y, ssm = ssd_scan(x, dt, A, B, C, self.chunk_size)  # s <= t
        y = y + self.D[:, None] * x
        if visual.any():
            keep = visual[..., None]
            xb, Bb, Cb = self._features((xBC * keep).flip(1), self.conv_backward)
            dtb = (dt * keep).flip(1)
            yb, _ = ssd_scan(xb, dtb, A, Bb, Cb, self.chunk_size)
            own = (Cb * Bb).sum(-1, keepdim=True) * dtb[..., None] * xb  # (B, L, H, P): the s = t term
            y = y + (yb - own).flip(1) * keep[..., None]  # s > t, visual tokens only
        K = self.conv_forward.kernel_size[0]
        conv_state = F.pad(xBC.transpose(1, 2), (K - 1, 0))[..., xBC.shape[1]:]  # (B, C, K-1): last K-1 inputs
        return self._output(y, z), FlexMACache(conv_state, ssm)

    def step(self, u: Tensor, cache: FlexMACache) -> tuple[Tensor, FlexMACache]:
        """One new text token, O(1) in the context length: u (B, 1, D) -> (B, 1, D) and the updated cache."""
        z, xBC, dt = self._split(u)
        window = torch.cat([cache.conv, xBC.transpose(1, 2)], dim=-1)  # (B, C, K)
        xBC = F.silu((window * self.conv_forward.weight.squeeze(1)).sum(-1) + self.conv_forward.bias)  # (B, C)
        x, B, C = (t.unflatten(-1, (self.heads, -1)) for t in xBC.split([self.d_inner] * 3, dim=-1))
        acc = cache.ssm.dtype  # the scan's accumulation precision
        dt = F.softplus(dt[:, 0] + self.dt_bias).to(acc)  # (B, H)
        decay = torch.exp(dt * -self.A_log.exp())[..., None, None]
        ssm = decay * cache.ssm + (dt[..., None] * x.to(acc))[..., None] * B.to(acc)[:, :, None, :]  # (B, H, P, N)
        y = (ssm @ C.to(acc)[..., None]).squeeze(-1).to(x.dtype) + self.D[:, None] * x  # (B, H, P)
        return self._output(y[:, None], z), FlexMACache(window[..., 1:], ssm)


# ----------------------------------------------------------------------------------------------
# 3. Local-Swin: shifted-window attention for adjacent tokens (LinMU Sec. 3.3)


def swin_windows(layout: TokenLayout, window: tuple[int, int, int], shifted: bool) -> tuple[Tensor, Tensor]:
    """Group the visual tokens of a layout into Swin windows over their (frames, rows, cols) grids.

    Along each axis of length n the window is w = min(window, n) (clipped to small grids). Shifted
    windows start half a window in, as Swin's cyclic roll by w // 2 plus its region mask does:
    cells [0, w//2) form their own (partial) window, then [w//2, w//2 + w), ...; an axis no longer
    than its window is not shifted. Tokens of different grids never share a window.
    Returns index (W, S): flat positions into the (B * L) tokens, and valid (W, S): False where a
    window has fewer than S tokens (the index there is a dummy 0).
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
    index = torch.zeros(len(counts), int(counts.max()) if len(counts) else 0, dtype=torch.long, device=device)
    valid = torch.zeros_like(index, dtype=torch.bool)
    index[window_id[order], rank] = flat[order]
    valid[window_id[order], rank] = True
    return index, valid


def sliding_window_attention(q: Tensor, k: Tensor, v: Tensor, window: int) -> Tensor:
    """Causal attention of each position to the previous `window` positions, itself included.

    q, k, v: (B, L, H, Dh) -> (B, L, H, Dh). Blocks of `window` queries attend to
    their own block and the one before, so the cost is O(L * window).
    """
    batch, length, heads, dim = q.shape
    pad = -length % window
    blocks = (length + pad) // window

    def blocked(t: Tensor) -> Tensor:  # (B, L, h, Dh) -> (B * blocks, h, window, Dh)
        t = F.pad(t, (0, 0, 0, 0, 0, pad)).unflatten(1, (blocks, window))
        return t.flatten(0, 1).transpose(1, 2)

    def with_previous(t: Tensor) -> Tensor:  # keys of block b: blocks b-1 and b -> (B * blocks, h, 2 window, Dh)
        t = blocked(t).unflatten(0, (batch, blocks))
        return torch.cat([F.pad(t, (0, 0, 0, 0, 0, 0, 1, 0))[:, :-1], t], dim=3).flatten(0, 1)

    i = torch.arange(window, device=q.device)[:, None]
    j = torch.arange(2 * window, device=q.device)[None, :]
    first_block = torch.arange(blocks, device=q.device)[:, None, None] == 0
    allowed = (j > i) & (j <= i + window) & ~(first_block & (j < window))  # (blocks, window, 2 window)
    out = F.scaled_dot_product_attention(blocked(q), with_previous(k), with_previous(v),
                                         attn_mask=allowed[:, None].repeat(batch, 1, 1, 1))
    return out.transpose(1, 2).unflatten(0, (batch, blocks)).flatten(1, 2)[:, :length]


class LocalSwin(nn.Module):
    """Local-Swin: attention over neighbouring tokens only, linear in length for fixed windows.

    * Visual tokens attend within Swin windows over their own grid: 2D (rows, cols) windows over an
      image tile, 3D (frames, rows, cols) windows over a video; odd layers shift the windows by half.
    * Text tokens attend causally to the previous `text_window` tokens of any modality, so decoding
      keeps a cache of text_window - 1 keys and values, not the whole context.
    The projections are the teacher's q/k/v/o (copied at conversion) and the teacher's rotary
    embedding is applied before windowing, so inside a window the relative positions are the teacher's.
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: int, cfg: MixerConfig, shifted: bool):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, head_dim
        self.window = (cfg.window_frames, cfg.window_rows, cfg.window_cols)
        self.text_window = cfg.text_window
        self.shifted = shifted
        self.q_proj = nn.Linear(d_model, heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d_model, kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(heads * head_dim, d_model, bias=False)

    def _qkv(self, x: Tensor, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor]:
        """x: (B, L, D) -> q, k, v (B, L, H, Dh): RoPE on q and k, the kv heads repeated to all heads."""
        q = self.q_proj(x).unflatten(-1, (self.heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.kv_heads, self.head_dim))
        repeat = lambda t: t.repeat_interleave(self.heads // self.kv_heads, dim=2)  # masked SDPA wants all heads
        return apply_rotary(q, *rope), repeat(apply_rotary(k, *rope)), repeat(v)

    def forward(self, x: Tensor, layout: TokenLayout, rope: tuple[Tensor, Tensor]) -> tuple[Tensor, KVCache]:
        """Full-sequence pass: x (B, L, D) -> (B, L, D) and the text window's cache."""
        batch, length, _ = x.shape
        q, k, v = self._qkv(x, rope)
        out = sliding_window_attention(q, k, v, self.text_window)  # every row; visual rows replaced below
        if layout.visual.any():
            index, valid = layout.memo(("swin", self.window, self.shifted), lambda: swin_windows(layout, self.window, self.shifted))
            gather = lambda t: t.flatten(0, 1)[index].transpose(1, 2)  # (B*L, h, Dh) -> (W, h, S, Dh)
            windowed = F.scaled_dot_product_attention(gather(q), gather(k), gather(v),
                                                      attn_mask=valid[:, None, None, :])
            out = out.flatten(0, 1).index_put((index[valid],), windowed.transpose(1, 2)[valid]).unflatten(0, (batch, length))
        first = max(0, length - (self.text_window - 1))
        cache = KVCache(k[:, first:].transpose(1, 2), v[:, first:].transpose(1, 2))
        return self.o_proj(out.flatten(2)), cache

    def step(self, x: Tensor, rope: tuple[Tensor, Tensor], cache: KVCache) -> tuple[Tensor, KVCache]:
        """One new text token: x (B, 1, D) attends to the cached window and itself -> (B, 1, D), new cache."""
        q, k, v = self._qkv(x, rope)
        k = torch.cat([cache.k, k.transpose(1, 2)], dim=2)  # (B, H, <= text_window, Dh)
        v = torch.cat([cache.v, v.transpose(1, 2)], dim=2)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k, v)  # (B, H, 1, Dh)
        first = max(0, k.shape[2] - (self.text_window - 1))
        return self.o_proj(out.transpose(1, 2).flatten(2)), KVCache(k[:, :, first:], v[:, :, first:])


# ----------------------------------------------------------------------------------------------
# 4. M-MATE: the two branches, fused per token (LinMU Sec. 3.1), initialized from attention


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
    """

    def __init__(self, d_model: int, heads: int, kv_heads: int, head_dim: int, cfg: MixerConfig,
                 shifted: bool, eps: float = 1e-5):
        super().__init__()
        self.flex = FlexMA(d_model, heads, head_dim, cfg, eps)
        self.swin = LocalSwin(d_model, heads, kv_heads, head_dim, cfg, shifted)
        self.gate = nn.Linear(d_model, 1)
        nn.init.zeros_(self.gate.weight)
        nn.init.zeros_(self.gate.bias)
        self.branches = cfg.branches

    @classmethod
    def from_attention(cls, attn: nn.Module, d_model: int, cfg: MixerConfig, shifted: bool, eps: float = 1e-5) -> MMATE:
        """Build an M-MATE layer from a (GQA) self-attention layer's q/k/v/o projections.

        Local-Swin takes q/k/v/o as they are. Flex-MA follows the attention-to-SSM mapping
        (linear attention's correspondence, as in "The Mamba in the Llama" and MaTVLM): C <- W_Q
        (scaled by 1/sqrt(head_dim), attention's temperature), B <- W_K, x <- W_V, out_proj <- W_O,
        with K and V rows repeated from the kv heads to every query head (GQA). The rest is ours:
        the convolutions start as the identity (last tap 1), W_z and the dt rows as 0 (so the gate
        and dt start input-independent), D as 0; dt_bias and A_log keep Mamba2's initialization.
        """
        heads, kv_heads, head_dim = attn.num_heads, attn.num_kv_heads, attn.head_dim
        layer = cls(d_model, heads, kv_heads, head_dim, cfg, shifted, eps).to(attn.q_proj.weight)
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

    def forward(self, x: Tensor, layout: TokenLayout, rope: tuple[Tensor, Tensor],
                cache: MMATECache | None = None) -> tuple[Tensor, MMATECache]:
        """The mixer contract of the decoder: x (B, L, D) -> (B, L, D) and the cache.

        With cache=None, x is the whole prompt. With a cache, x holds new text tokens, decoded one
        at a time in O(1) each (Flex-MA's recurrent step, Local-Swin's window).
        """
        if cache is None:
            flex, flex_cache = self.flex(x, layout.visual) if self.branches != "swin" else (None, None)
            swin, swin_cache = self.swin(x, layout, rope) if self.branches != "flex" else (None, None)
            return self._mix(x, flex, swin), MMATECache(flex_cache, swin_cache)
        if layout.visual.any():
            raise ValueError("M-MATE decodes text tokens only: pass images and video in the prompt (cache=None)")
        outputs = []
        for t in range(x.shape[1]):
            x_t, rope_t = x[:, t:t + 1], (rope[0][:, t:t + 1], rope[1][:, t:t + 1])
            flex, flex_cache = self.flex.step(x_t, cache.flex) if self.branches != "swin" else (None, None)
            swin, swin_cache = self.swin.step(x_t, rope_t, cache.swin) if self.branches != "flex" else (None, None)
            cache = MMATECache(flex_cache, swin_cache)
            outputs.append(self._mix(x_t, flex, swin))
        return torch.cat(outputs, dim=1), cache

    def _mix(self, x: Tensor, flex: Tensor | None, swin: Tensor | None) -> Tensor:
        if flex is None or swin is None:
            return swin if flex is None else flex
        g = torch.sigmoid(self.gate(x))  # (B, L, 1)
        return g * flex + (1 - g) * swin


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
