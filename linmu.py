"""LinMU: Multimodal Understanding Made Linear (Wang & Jha, arXiv 2601.01322), the paper in plain PyTorch.

Read it top to bottom next to the paper:

  1. the chunked SSD scan (Mamba2's state space duality), linear in the sequence length;
  2. Flex-MA, the bidirectional Mamba2-style branch for global context, with Rotary Major-Scan;
  3. Local-Swin, shifted-window attention for neighbouring tokens;
  4. M-MATE, the two branches mixed by a per-token gate, and its initialization from attention;
  5. LoRA, for the last distillation stage;
  6. the conversion of a decoder's attention layers into M-MATE layers.

Shapes are written (B, L, H, P) style: batch, length, heads, head dim; N is the SSM state size,
G the number of B/C groups, D the model width. "Ours" marks a choice where the paper is silent.

This file imports only torch. The vision-language model it plugs into is smolvlm.py; whatever
exists only for speed (a CPU's pieces, torch.compile, CUDA graphs) is speed.py, tested equal to
the code here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn


# ----------------------------------------------------------------------------------------------
# 1. The chunked SSD scan (Mamba2's state space duality, Dao & Gu 2024): the engine of Flex-MA


def segment_decay(a: Tensor) -> Tensor:
    """out[..., i, j] = exp(a[..., j+1] + ... + a[..., i]) for i >= j (1 on the diagonal), 0 for i < j.

    The exponent is a cumulative sum of a masked copy of a, never a difference of two long partial
    sums, so it stays exact for long spans (ssd_minimal's stable segment sum). The zeros above the
    diagonal are set after the exp (ours: where ssd_minimal fills -inf before it, one masking fewer;
    the exponent there is 0, so neither value nor gradient overflows). a: (..., T) -> (..., T, T).
    """
    T = a.size(-1)
    sums = a[..., None].expand(*a.shape, T).tril(-1).cumsum(dim=-2)  # [i, j]: a_{j+1} + ... + a_i, 0 for i <= j
    return sums.exp_().tril()  # exp in place: cumsum's backward does not need its output


def carry_across_chunks(chunk_states: Tensor, chunk_log_decay: Tensor, state: Tensor | None,
                        chunks_per_block: int) -> tuple[Tensor, Tensor]:
    """SSD's step 3: the state entering each chunk, s_c = exp(a_{c-1}) s_{c-1} + own_{c-1}, s_0 = state.

    For S independent sequences (batch times heads), states flattened (P N -> PN): chunk_states
    (S, c, PN) each chunk's own final state (own_c); chunk_log_decay (S, c) the log decay a_c across
    chunk c; state (S, PN) before the first chunk, None for zeros. Returns the state entering each
    chunk (S, c, PN) and the state after the last one (S, PN).

    ssd_minimal writes this recurrence as one matmul with a (c x c) segment-sum of decays, whose
    cost grows with c^2. Here it has two levels, each one segment-sum matmul, so that the cost
    stays linear and the number of torch operations does not depend on c:
      * within blocks of R = chunks_per_block chunks, from the block's own chunks ((R+1) x R per block);
      * across blocks, from each block's own final state and `state`: ((c/R + 1) x (c/R + 1)), a
        quadratic term with a small constant: with R = 16, P = N = 64 and Q = 128 its FLOPs are
        about 0.3% of steps 1, 2 and 4's at 75k tokens and 4% at a million.
    """
    sequences, chunks, PN = chunk_states.shape
    R = chunks_per_block
    blocks = torch.sym_max(2, chunks // R + 1)  # one padded chunk (no input, no decay), two blocks at least: ssd_scan
    pad = blocks * R - chunks
    own = F.pad(chunk_states, (0, 0, 0, pad)).view(sequences * blocks, R, PN)  # (S b, R, PN)
    log_decay = F.pad(chunk_log_decay, (0, pad)).view(sequences, blocks, R)  # (S, b, R)

    # within a block: decay[r, j] = exp(a_j + ... + a_{r-1}) for j <= r, over the R + 1 boundaries
    decay = segment_decay(F.pad(log_decay, (1, 0)).view(sequences * blocks, R + 1))  # (S b, R+1, R+1)
    # row r < R: what enters chunk r from the block's earlier chunks; row R: the block's own final state
    within = torch.bmm(decay[:, :, 1:], own).view(sequences, blocks, R + 1, PN)

    # across blocks, ssd_minimal's form: row k is the state entering block k, row b the final state
    finals = (F.pad(within[:, :, R], (0, 0, 1, 0)) if state is None
              else torch.cat([state[:, None], within[:, :, R]], dim=1))  # (S, b+1, PN)
    entering_blocks = torch.bmm(segment_decay(F.pad(log_decay.sum(-1), (1, 0))), finals)  # (S, b+1, PN)

    # entering chunk r of block k: block k's entering state decayed to chunk r, plus the block's own part
    entering = torch.addcmul(within[:, :, :R], decay.view(sequences, blocks, R + 1, R + 1)[:, :, :R, :1],
                             entering_blocks[:, :-1, None])  # (S, b, R, PN)
    return entering.flatten(1, 2)[:, :chunks], entering_blocks[:, -1]


def ssd_scan(x: Tensor, dt: Tensor, A: Tensor, B: Tensor, C: Tensor, chunk_size: int, chunks_per_block: int,
             initial_state: Tensor | None = None, exclusive: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The selective-SSM recurrence, computed chunk by chunk (Mamba2's SSD algorithm).

        h_t = exp(dt_t * A) * h_{t-1} + dt_t * (x_t outer B_t),    y_t = h_t . C_t
    or, for the sequences where exclusive is True, y_t = exp(dt_t * A) h_{t-1} . C_t: the output
    leaves out token t's own input.

    x: (B, L, H, P); dt: (B, L, H), positive; A: (H,), negative; B, C: (B, L, G, N), H a multiple
    of G; chunk_size Q and chunks_per_block R: see Chunking (speed and memory, not the result);
    initial_state: (B, H, P, N) or None (zeros); exclusive: (B,) bool or None (none). Returns
    y (B, L, H, P) in x's dtype and the final state (B, H, P, N) in the float32 (float64 for
    float64 inputs) the scan accumulates in.

    Four steps per chunk of Q tokens: (1) outputs from inputs inside the chunk, a Q x Q masked
    matmul; (2) each chunk's state from its own inputs; (3) the state carried from chunk to chunk
    (carry_across_chunks); (4) outputs from the carried-in state. The cost is O(L Q (N + P) H):
    linear in L, in a fixed number of batched operations whatever L is. Every matmul is one batched
    matmul over the B H c chunks of all heads (ours: laid out once, so that none copies or reshapes).
    Precision, as in Mamba2's own kernels: the matmuls take their operands in the inputs' dtype (on
    a GPU, bf16: tensor cores, and half the bytes of the Q x Q scores) and accumulate in float32;
    the decays, the carried state and step 3 are float32 throughout.
    """
    batch, length, heads, head_dim = x.shape
    if heads % B.shape[2]:
        raise ValueError(f"ssd_scan: {heads} heads is not a multiple of {B.shape[2]} B/C groups")
    dtype, N = x.dtype, B.shape[-1]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    # Padded steps have dt = 0: no input and no decay, the state unchanged. There is always at least
    # one, and at least two chunks, so that every length has the same shape arithmetic and no size of
    # 1 (ours: torch.compile would specialise on either, and this way one graph serves every length).
    chunks = torch.sym_max(2, length // chunk_size + 1)
    pad = chunks * chunk_size - length
    chunked = lambda t: F.pad(t.movedim(1, 2), (0, 0) * (t.dim() - 3) + (0, pad)).view(  # zero-padded: one copy
        batch * heads * chunks, chunk_size, *t.shape[3:])  # (B, L, H, ...) -> (B H c, Q, ...)

    if heads != B.shape[2]:
        B, C = (t.repeat_interleave(heads // t.shape[2], dim=2) for t in (B, C))
    dt = dt.to(acc)
    x_dt, B, C = chunked((x * dt[..., None]).to(dtype)), chunked(B), chunked(C)  # (B H c, Q, P), (B H c, Q, N) twice
    cum = chunked(dt * A.to(acc)).cumsum(dim=-1)  # (B H c, Q) the log decay from the chunk's start

    # 1. Within each chunk: y_i = sum_{j <= i} (C_i . B_j) exp(cum_i - cum_j) dt_j x_j (j < i if exclusive).
    # A difference of the chunk's running sums, as in steps 2 and 4 and in Mamba2's kernels: within one
    # chunk it is exact enough, and it costs one Q x Q temporary, which torch.compile fuses away
    # (segment_decay's cumulative form is for step 3's long spans).
    position = torch.arange(chunk_size, device=x.device)
    behind = position[:, None] - position  # (Q, Q): i - j
    decay = cum[:, :, None] - cum[:, None, :]  # (B H c, Q, Q)
    if exclusive is None:
        decay.masked_fill_(behind < 0, -math.inf)
    else:  # the closest j: i, or i - 1 where exclusive
        decay.view(batch, -1, chunk_size, chunk_size).masked_fill_(behind < exclusive.view(-1, 1, 1, 1), -math.inf)
    scores = torch.bmm(C, B.mT).mul_(decay.exp_())  # (B H c, Q, Q), in place: the largest temporaries
    del decay
    y = torch.bmm(scores, x_dt)  # (B H c, Q, P)
    del scores

    # 2. Each chunk's final state from its own inputs, decayed to the chunk's end
    to_end = (cum[:, -1:] - cum).exp()  # (B H c, Q)
    chunk_states = torch.bmm(x_dt.mT, (B * to_end[..., None]).to(dtype)).to(acc)  # (B H c, P, N)

    # 3. Carry the state across chunks: entering[:, c] is the state before chunk c
    state = None if initial_state is None else initial_state.to(acc).view(batch * heads, head_dim * N)
    entering, state = carry_across_chunks(chunk_states.view(batch * heads, chunks, head_dim * N),
                                          cum[:, -1].view(batch * heads, chunks), state, chunks_per_block)
    # entering: (B H, c, PN); state: (B H, PN)

    # 4. Outputs from the carried-in state, decayed to each position
    y = torch.baddbmm(y, C * cum.exp()[..., None].to(dtype), entering.reshape(-1, head_dim, N).mT.to(dtype))
    # Contiguous (ours): from this transposed view, torch.compile's training graphs fix the strides of what
    # follows to the first length they see, and assert them at the next (inductor, torch 2.14).
    y = y.view(batch, heads, chunks * chunk_size, head_dim)[:, :, :length].transpose(1, 2).contiguous()
    return y, state.view(batch, heads, head_dim, N)  # (B, L, H, P), (B, H, P, N)


@dataclass(frozen=True)
class Chunking:
    """How ssd_scan cuts a sequence: chunk_size tokens a chunk (Q), chunks_per_block chunks a block of
    step 3 (R). They change speed and memory, never the result beyond rounding; speed.py chooses
    them per device (RESULTS.md, "Device settings"), and a prompt's PromptPlan carries them."""

    chunk_size: int = 64
    chunks_per_block: int = 16


# ----------------------------------------------------------------------------------------------
# 2. Flex-MA: the paper's bidirectional state-space branch for global context


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
    The SSD scan's chunk length is not a property of the model but of how it runs: see Chunking.
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



@dataclass
class TokenLayout:
    """Where each token of a (B, L) multimodal prompt sits.

    positions: (B, L) absolute positions (for RoPE);
    visual:    (B, L) True for image/video tokens;
    cells:     (B, L, 4) (grid, frame, row, col) of each visual token, -1 for text;
    grid_shapes: per batch element, the (frames, rows, cols) of each visual grid in order;
    lengths:   (B,) each sequence's real tokens: the first lengths[b], the rest right padding.
    An image tile is a (1, rows, cols) grid, a video a (frames, rows, cols) grid.

    Right padding is text after every real token: no real token's output depends on it (text and
    Local-Swin are causal, the backward scan and Swin windows see visual tokens only), and no
    decoding state is built from it (FlexMA.forward, LocalSwin.forward).
    """

    positions: Tensor
    visual: Tensor
    cells: Tensor
    grid_shapes: list[list[tuple[int, int, int]]]
    lengths: Tensor

    @classmethod
    def build(cls, input_ids: Tensor, image_token_id: int, grids: list[list[tuple[int, int, int]]] | None,
              attention_mask: Tensor | None = None) -> TokenLayout:
        """Lay out a prompt: the image tokens of row b fill grids[b] in order, each frame row-major.
        attention_mask (B, L): 1 on real tokens, 0 on right padding (as processing.Processor.collate
        pads); None: no padding."""
        batch, length = input_ids.shape
        device = input_ids.device
        grid_shapes = [list(map(tuple, g)) for g in grids] if grids is not None else [[] for _ in range(batch)]
        if len(grid_shapes) != batch:
            raise ValueError(f"grids has {len(grid_shapes)} entries for a batch of {batch}: give one list of "
                             "(frames, rows, cols) per sequence")
        visual = input_ids == image_token_id
        if attention_mask is None:
            lengths = torch.full((batch,), length, device=device)
        else:
            if attention_mask.shape != input_ids.shape:
                raise ValueError(f"attention_mask {list(attention_mask.shape)} is not the shape of input_ids "
                                 f"{list(input_ids.shape)}")
            lengths = attention_mask.sum(1)
            real = torch.arange(length, device=device) < lengths[:, None]  # (B, L)
            if not torch.equal(attention_mask.bool(), real) or not bool(lengths.all()):
                raise ValueError("attention_mask is not right padding: each row must be 1 on its real tokens (one at "
                                 "least), then 0 on padding; left padding and holes are not supported")
            if bool((visual & ~real).any()):
                raise ValueError("image tokens in the padding (attention_mask 0): pad with a text token")
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
        return cls(positions, visual, cells, grid_shapes, lengths)



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
    Returns (order, inverse), (B, L) each, flat positions into the B * L tokens (as Windows' are):
    x.flatten(0, 1)[order] is the scanned sequence, and y.flatten(0, 1)[inverse] puts the scan's
    outputs back in the prompt's order (one indexing each, whatever x's trailing dimensions).
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
    return order.view(batch, length), inverse.view(batch, length)


@dataclass
class FlexMACache:
    """Flex-MA's decoding state, updated in place: each sequence's last conv_kernel - 1 conv inputs (B, C, K-1)
    and its SSM state (B, H, P, N), both after its last real token."""

    conv: Tensor
    ssm: Tensor


@dataclass
class FlexPrompt:
    """What Flex-MA reads of a prompt besides its tokens: the same for every layer, so PromptPlan builds it
    once per prompt (FlexPrompt.build) instead of every layer recomputing it.

    visual: (B, L) bool, or None for a prompt without visual tokens (no backward scan);
    reads: (d B, L, 1) bool, d = 2 directions with visual tokens, else 1: True where a direction's scan
      reads the token, whose dt is zeroed elsewhere: the forward direction reads the real tokens
      (padding's dt = 0 leaves the state unchanged), the backward one the visual tokens, in reverse
      order (text's dt = 0 passes the state through, and its conv inputs are zeroed too);
    exclusive: (d B,) bool, True for the backward direction's sequences (ssd_scan's exclusive mode);
    last: (B, K - 1) the flat positions (into the B * L tokens) of each sequence's last K - 1 real
      tokens, the decoding's conv state (FlexMA.conv_state), and kept (B, K - 1, 1) bool: False for
      those before the first token (a prompt shorter than K - 1), which the state holds as zeros."""

    visual: Tensor | None
    reads: Tensor
    exclusive: Tensor
    last: Tensor
    kept: Tensor

    @classmethod
    def build(cls, visual: Tensor | None, lengths: Tensor, length: int, conv_kernel: int) -> FlexPrompt:
        """visual: (B, L) bool or None; lengths: (B,) each sequence's real tokens, right padding after
        them (TokenLayout); length: L; conv_kernel: K."""
        batch, device = len(lengths), lengths.device
        real = torch.arange(length, device=device) < lengths[:, None]  # (B, L)
        reads = real if visual is None else torch.cat([real, visual.flip(1)])  # (d B, L)
        last = lengths[:, None] - (conv_kernel - 1) + torch.arange(conv_kernel - 1, device=device)  # (B, K-1)
        return cls(visual, reads[..., None], torch.arange(len(reads), device=device) >= batch,
                   torch.arange(batch, device=device)[:, None] * length + last.clamp(min=0), last[..., None] >= 0)


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
        part is a contiguous tensor for the convolution's elementwise passes (RESULTS.md, "Flex-MA
        input projection")."""
        return tuple(F.linear(u, w) for w in self.in_proj.weight.split([self.d_inner, self.conv_dim, self.heads]))

    def _convolutions(self, backward: bool) -> tuple[Tensor, Tensor]:
        """The directions' convolutions stacked, forward first (_features): weight (d, conv_dim, 1, K), bias
        (d, conv_dim)."""
        convs = [self.conv_forward, self.conv_backward] if backward else [self.conv_forward]
        return torch.stack([conv.weight for conv in convs]), torch.stack([conv.bias for conv in convs])

    def _features(self, xBC: Tensor, weight: Tensor, bias: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Causal depthwise conv + SiLU, then split, for d directions stacked along the batch:
        xBC (d B, K - 1 + n, conv_dim), the n inputs after the K - 1 before them; weight (d, conv_dim, 1, K)
        and bias (d, conv_dim), each direction's convolution -> x (d B, n, H, P), B and C (d B, n, H, N).

        The convolution is written as K shifted multiply-adds along the sequence: for depthwise
        kernels this is faster than nn.Conv1d, needs no transposes, and takes one kernel per direction."""
        directions, K = weight.shape[0], weight.shape[-1]
        n = xBC.shape[1] - (K - 1)
        seq = xBC.unflatten(0, (directions, -1))  # (d, B, K - 1 + n, conv_dim)
        taps = weight.view(directions, 1, 1, -1, K).unbind(-1)  # K of (d, 1, 1, conv_dim)
        out = torch.addcmul(bias.view(directions, 1, 1, -1), seq[:, :, :n], taps[0])
        for k in range(1, K):
            out.addcmul_(seq[:, :, k:k + n], taps[k])  # in place: addcmul's backward does not read out
        # x, B, C: (d B, n, H, P) each, N = P
        return F.silu(out).view(directions * out.shape[1], n, 3, self.heads, self.head_dim).unbind(2)

    def _scan(self, xBC: Tensor, dt: Tensor, prompt: FlexPrompt, chunking: Chunking) -> tuple[Tensor, Tensor]:
        """Both directions of Flex-MA over the whole prompt, as one batch of scans.

        The forward direction is conv_forward and the scan over s <= t, plus D x_t. The backward
        direction is the same computation on the reversed sequence, with the text tokens' conv
        inputs and dt zeroed, conv_backward and the exclusive scan (s > t): a second batch of
        sequences behind the forward one, so both directions are one scan.
        xBC: (B, L, conv_dim), dt: (B, L, H) -> y (B, L, H, P), and the forward direction's final
        state (B, H, P, N); what each direction reads: prompt (FlexPrompt).
        """
        batch = xBC.shape[0]
        weight, bias = self._convolutions(prompt.visual is not None)
        K = weight.shape[-1]
        if prompt.visual is not None:  # the backward direction: the sequence reversed, text's conv inputs zeroed
            xBC = torch.cat([xBC, xBC.flip(1) * prompt.reads[batch:]])  # (d B, L, conv_dim)
            dt = torch.cat([dt, dt.flip(1)])  # (d B, L, H)
        inputs = F.pad(xBC, (0, 0, K - 1, 0))  # (d B, K - 1 + L, conv_dim): zeros before the first
        x, B, C = self._features(inputs, weight, bias)  # (d B, L, H, P), (d B, L, H, N) twice
        del inputs  # freed before the scan's temporaries
        out, state = ssd_scan(x, dt * prompt.reads, -self.A_log.exp(), B, C, chunking.chunk_size,
                              chunking.chunks_per_block, exclusive=prompt.exclusive)  # (d B, L, H, P)
        y = torch.addcmul(out[:batch], self.D[:, None], x[:batch])  # + D x_t
        if prompt.visual is not None:  # back in the original order, to visual tokens only
            y.addcmul_(out[batch:].flip(1), prompt.visual[..., None, None])
        return y, state[:batch]

    def _output(self, y: Tensor, z: Tensor) -> Tensor:
        """Gated per-head RMSNorm and output projection: y (B, n, H, P), z (B, n, H*P) -> (B, n, D)."""
        gate = F.silu(z + self.z_bias).unflatten(-1, (self.heads, self.head_dim))
        return self.out_proj(self.norm(y * gate).flatten(2))

    def forward(self, u: Tensor, prompt: FlexPrompt, scan: tuple[Tensor, Tensor] | None = None,
                chunking: Chunking = Chunking()) -> tuple[Tensor, FlexMACache]:
        """Full-sequence pass. u: (B, L, D); prompt: its visual tokens, padding and ends (FlexPrompt);
        scan: this layer's (order, inverse) of Rotary Major-Scan, or None to scan the prompt's own
        order; chunking: the scan's. Returns (B, L, D) and the decoding cache, each sequence's state
        after its last real token.

        Padding gets dt = 0, which leaves the state unchanged (as for text in the backward scan), so
        the forward scan's final state is the one after the last real token; the conv state is
        each sequence's last K - 1 real inputs. Padding is text, which a Rotary Major-Scan leaves in
        place: in scan order too, a sequence's real tokens come first, and visual positions stay visual."""
        if scan is not None:
            u = u.flatten(0, 1)[scan[0]]
        z, xBC, dt = self._split(u)
        y, ssm = self._scan(xBC, F.softplus(dt + self.dt_bias), prompt, chunking)  # (B, L, H, P)
        out = self._output(y, z)
        if scan is not None:
            out = out.flatten(0, 1)[scan[1]]  # back in the prompt's order
        return out, FlexMACache(self.conv_state(xBC, prompt), ssm)

    def conv_state(self, xBC: Tensor, prompt: FlexPrompt) -> Tensor:
        """The decoding cache's conv inputs: each sequence's last K-1 real inputs of xBC (B, L, conv_dim),
        zeros before the first token (FlexPrompt.last) -> (B, conv_dim, K-1)."""
        return (xBC.flatten(0, 1)[prompt.last] * prompt.kept).transpose(1, 2)

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


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotary position embedding (Llama's rotate-half form). x: (B, L, H, Dh); cos, sin: (B, L, Dh)."""
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos[:, :, None, :] + rotated * sin[:, :, None, :]


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
    Each sequence has its own position: slots it has not written yet (past its prompt, or before
    it in the ring) hold any finite values and are masked out."""

    k: Tensor
    v: Tensor

    def write(self, slot: Tensor, k: Tensor, v: Tensor) -> None:
        """Each sequence's new key and value, k and v (B, 1, Hkv, Dh), written in place at its own slot (B,)."""
        index = slot[:, None, None, None].expand(-1, self.k.shape[1], 1, self.k.shape[3])  # (B, Hkv, 1, Dh)
        self.k.scatter_(2, index, k.transpose(1, 2))
        self.v.scatter_(2, index, v.transpose(1, 2))


def cached_attention(q: Tensor, cache: KVCache, visible: Tensor) -> Tensor:
    """One new token per sequence attends to the cache's visible slots: q (B, 1, H, Dh), visible
    (B, slots) bool -> (B, 1, H Dh). SDPA with enable_gqa, rather than a kv head's query heads laid
    along the query axis (RESULTS.md, "Decoding attention form")."""
    y = F.scaled_dot_product_attention(q.transpose(1, 2), cache.k, cache.v, attn_mask=visible[:, None, None],
                                       enable_gqa=True)  # (B, H, 1, Dh)
    return y.transpose(1, 2).flatten(2)


@dataclass
class Windows:
    """Groups of tokens that attend among themselves: window w's queries attend to its keys where mask allows.

    Positions are flat indices into the (B * L) tokens of a batch. queries: (W, Sq); keys: (W, Sk);
    mask: (W, 1, Sq or 1, Sk), SDPA's additive mask in the queries' dtype: 0 where a query may attend
    to a key, -inf where not (every query row allows at least one key; additive rather than boolean,
    which SDPA would turn into this in every layer); writes: (W, Sq), True for the queries whose
    output this window gives (each token is written by exactly one window; other entries are padding
    or belong to another window)."""

    queries: Tensor
    keys: Tensor
    mask: Tensor
    writes: Tensor


def additive_mask(allowed: Tensor, dtype: torch.dtype) -> Tensor:
    """A boolean mask (W, Sq or 1, Sk), True where a query may attend, as Windows.mask: (W, 1, Sq or 1, Sk)."""
    return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill_(~allowed, -math.inf)[:, None]


def swin_windows(layout: TokenLayout, window: tuple[int, int, int], shifted: bool, dtype: torch.dtype) -> Windows:
    """The visual tokens of a layout grouped into Swin windows over their (frames, rows, cols) grids.

    Along each axis of length n the window is w = min(window, n) (clipped to small grids). Shifted
    windows start half a window in, as Swin's cyclic roll by w // 2 plus its region mask does:
    cells [0, w//2) form their own (partial) window, then [w//2, w//2 + w), ...; an axis no longer
    than its window is not shifted. Tokens of different grids never share a window. Queries and
    keys are the window's tokens (S of them, padded with a dummy 0 where a window has fewer); dtype:
    the queries' (Windows.mask).
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
    return Windows(index, index, additive_mask(valid[:, None, :], dtype), valid)


TEXT_BLOCK = 16  # text queries are windowed in blocks of this many consecutive positions


def text_windows(layout: TokenLayout, text_window: int, dtype: torch.dtype) -> Windows:
    """Causal sliding windows for the text tokens: each attends to the text_window positions ending at itself.

    Consecutive positions form blocks of b = min(TEXT_BLOCK, text_window) queries, whose keys are
    the b + text_window - 1 positions ending at the block's last; a block becomes a window only if
    it holds a text query, so the cost is O(text tokens * text_window), and nothing for visual rows.
    dtype: the queries' (Windows.mask).
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
                   additive_mask(mask[kept], dtype), text[sample, kept])


@dataclass
class LocalWindows:
    """All of Local-Swin's windows over one prompt: the text windows and the Swin windows (None
    when the prompt has no text, or no visual token); source (B, L): for each token, the row of the
    windows' concatenated outputs (text windows' query slots, then Swin windows') that holds its
    output; and ring (B, text_window), the flat position of the token each slot of the text
    window's decoding ring holds after the prompt (LocalSwin.attend_windows)."""

    text: Windows | None
    swin: Windows | None
    source: Tensor
    ring: Tensor

    @property
    def present(self) -> list[Windows]:
        """The kinds of window this prompt has, in the order their query slots are laid out."""
        return [w for w in (self.text, self.swin) if w is not None]

    @classmethod
    def build(cls, layout: TokenLayout, text: Windows | None, swin: Windows | None, text_window: int) -> LocalWindows:
        batch, length = layout.visual.shape
        device = layout.visual.device
        # the ring: position p in slot p mod W. Of a sequence of n real tokens, slot s holds the p = s mod W
        # in [n - W, n): the last W - 1 real tokens, and in slot n mod W the one the next token overwrites
        # (slots of positions before the prompt, p < 0, get any finite values: masked until overwritten)
        n = layout.lengths[:, None]
        held = n - text_window + (torch.arange(text_window, device=device) - n) % text_window  # (B, W)
        ring = torch.arange(batch, device=device)[:, None] * length + held.clamp(min=0)
        built = cls(text, swin, torch.empty(batch, length, dtype=torch.long, device=device), ring)
        source, start = built.source.view(-1), 0  # (B * L,), filled in place
        for windows in built.present:
            slots = windows.writes.flatten().nonzero().squeeze(1)  # the query slots that give a token's output
            source[windows.queries.flatten()[slots]] = start + slots
            start += windows.writes.numel()
        return built


def window_attention(q: Tensor, k: Tensor, v: Tensor, windows: Windows) -> Tensor:
    """Each window's queries attend to its keys: q (N, H, Dh); k, v (N, Hkv, Dh), N = B * L flat
    tokens, H a multiple of Hkv -> the outputs of every query slot (W, Sq, H, Dh)."""
    gather = lambda t, index: t[index].transpose(1, 2)  # (N, h, Dh) -> (W, h, S, Dh)
    attended = F.scaled_dot_product_attention(gather(q, windows.queries), gather(k, windows.keys),
                                              gather(v, windows.keys), attn_mask=windows.mask,
                                              enable_gqa=True)  # (W, H, Sq, Dh)
    return attended.transpose(1, 2)


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
        """Full-sequence pass: x (B, L, D) -> (B, L, D) and the text window's ring for decoding, which
        holds each sequence's last W - 1 real tokens (LocalWindows.ring)."""
        out, ring = self.attend_windows(*self.qkv(x, *rope), windows)
        return self.o_proj(out), ring

    def attend_windows(self, q: Tensor, k: Tensor, v: Tensor, windows: LocalWindows) -> tuple[Tensor, KVCache]:
        """The prompt's windows: q (B, L, H, Dh), k and v (B, L, Hkv, Dh) -> the attention's output
        (B, L, H Dh), before o_proj, and the ring of the text window (speed.FusedMMATE projects its own q, k, v)."""
        q, k, v = (t.flatten(0, 1) for t in (q, k, v))  # (B * L, h, Dh)
        slots = torch.cat([self.attend(q, k, v, w).flatten(0, 1) for w in windows.present])  # every query slot
        out = slots[windows.source]  # (B, L, H, Dh): each token's output, from the window that gives it
        ring = [t[windows.ring].transpose(1, 2) for t in (k, v)]  # (B, Hkv, W, Dh)
        return out.flatten(2), KVCache(*ring)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, windows: Windows) -> Tensor:
        """One kind of window over the prompt's flat tokens -> (W, Sq, H, Dh) (window_attention)."""
        return window_attention(q, k, v, windows)

    def step(self, x: Tensor, rope: tuple[Tensor, Tensor], position: Tensor, cache: KVCache) -> Tensor:
        """One new text token per sequence, at its own position ((B,) long): x (B, 1, D) attends to its
        ring and itself -> (B, 1, D)."""
        return self.o_proj(self.attend_ring(*self.qkv(x, *rope), position, cache))

    def attend_ring(self, q: Tensor, k: Tensor, v: Tensor, position: Tensor, cache: KVCache) -> Tensor:
        """One new token per sequence at its position ((B,) long): its key and value k, v (B, 1, Hkv, Dh)
        into the ring, its query q (B, 1, H, Dh) over the ring -> (B, 1, H Dh), before o_proj."""
        cache.write(position % self.text_window, k, v)
        filled = torch.arange(self.text_window, device=q.device) <= position[:, None]  # (B, W): all once p >= W - 1
        return cached_attention(q, cache, filled)


# ----------------------------------------------------------------------------------------------
# 4. M-MATE: the paper's dual-branch block that replaces each decoder self-attention


@dataclass
class PromptPlan:
    """What one decoder layer needs to know about a prompt. TextModel.plan works out the plans of all
    layers once, before the first, so that no layer computes anything from the prompt's content or
    waits on the host. A student's layers differ only in what their plans hold (layer_pattern):
    shifted Swin windows or not, and the Rotary Major-Scan order, data and not code; so that one
    compiled graph serves every layer (speed.compile_model).

    rope: (cos, sin), each (B, L, Dh); flex: what Flex-MA reads of the prompt (FlexPrompt), None
    for the teacher; windows: this layer's Local-Swin windows, None for the teacher; scan: this layer's
    Rotary Major-Scan (order, inverse), None to scan the prompt's own order (the teacher, a student
    without rotary_scan, a prompt without visual tokens). With rotary_scan, the first of MAJOR_ORDERS,
    the prompt's own, is an order too (ours: its two indexings cost little, and every layer of a
    visual prompt runs one graph); new_tokens: how many tokens the decoding caches leave room for after
    the prompt; chunking: Flex-MA's scan's."""

    rope: tuple[Tensor, Tensor]
    flex: FlexPrompt | None
    windows: LocalWindows | None
    scan: tuple[Tensor, Tensor] | None = None
    new_tokens: int = 0
    chunking: Chunking = Chunking()

    @classmethod
    def build(cls, layout: TokenLayout, rope: tuple[Tensor, Tensor], mixer: MixerConfig | None, layers: int,
              new_tokens: int = 0, chunking: Chunking = Chunking()) -> list[PromptPlan]:
        """The plans of a prompt for `layers` decoder layers of the teacher (mixer None) or of a
        student with these M-MATE settings. Here, once per prompt, the host may wait on the device
        (nonzero, unique, counts); each kind of window and each scan order is built once and shared."""
        if mixer is None:
            return [cls(rope, None, None, None, new_tokens, chunking)] * layers
        has_visual, has_text = bool(layout.visual.any()), not bool(layout.visual.all())
        flex = FlexPrompt.build(layout.visual if has_visual else None, layout.lengths, layout.visual.shape[1],
                                mixer.conv_kernel)
        patterns = [layer_pattern(index) for index in range(layers)]
        scans = {order: major_order(layout, MAJOR_ORDERS[order]) if mixer.rotary_scan and has_visual else None
                 for order in {pattern["scan_order"] for pattern in patterns}}
        dtype = rope[0].dtype  # the queries' (TextModel.plan): the windows' additive masks are in it
        text = text_windows(layout, mixer.text_window, dtype) if has_text else None
        shape = (mixer.window_frames, mixer.window_rows, mixer.window_cols)
        windows = {shifted: LocalWindows.build(layout, text, swin_windows(layout, shape, shifted, dtype)
                                               if has_visual else None, mixer.text_window)
                   for shifted in {pattern["shifted"] for pattern in patterns}}
        return [cls(rope, flex, windows[pattern["shifted"]], scans[pattern["scan_order"]], new_tokens, chunking)
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
            per_head = lambda w: (w.unflatten(0, (kv_heads, head_dim))  # kv head rows, repeated for its query heads
                                  .repeat_interleave(heads // kv_heads, 0).flatten(0, 1))
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
        flex, flex_cache = (self.flex(x, plan.flex, plan.scan, plan.chunking) if self.branches != "swin"
                            else (None, None))
        swin, swin_cache = (self.swin(x, plan.rope, plan.windows) if self.branches != "flex"
                            else (None, None))
        return self._mix(x, flex, swin), MMATECache(flex_cache, swin_cache)

    def step(self, x: Tensor, rope: tuple[Tensor, Tensor], position: Tensor, cache: MMATECache) -> Tensor:
        """One new text token per sequence, O(1) in the context: Flex-MA's recurrent step and Local-Swin's
        ring. x (B, 1, D), each sequence at its own `position` ((B,) long) -> (B, 1, D); the cache is
        updated in place."""
        flex = self.flex.step(x, cache.flex) if self.branches != "swin" else None
        swin = self.swin.step(x, rope, position, cache.swin) if self.branches != "flex" else None
        return self._mix(x, flex, swin)

    def _mix(self, x: Tensor, flex: Tensor | None, swin: Tensor | None) -> Tensor:
        if flex is None or swin is None:
            return swin if flex is None else flex
        return self._gated_sum(x, flex, swin)

    def _gated_sum(self, x: Tensor, flex: Tensor, swin: Tensor) -> Tensor:
        """x, flex, swin: (B, n, D) -> the gated mix (B, n, D)."""
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
        like = dict(dtype=base.weight.dtype, device=base.weight.device)
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **like))  # (r, in)
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **like))  # (out, r)
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


def add_lora(model: nn.Module, targets: list[str], rank: int = 8, alpha: float = 16.0,
             dropout: float = 0.0) -> list[str]:
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
# 6. Conversion: every self-attention layer of a decoder becomes an M-MATE layer


def convert_layers(layers: nn.ModuleList, d_model: int, mixer: MixerConfig, eps: float = 1e-5) -> None:
    """Replace the self-attention (the `self_attn` module, a Llama-style decoder's name for it) of every
    layer by an M-MATE layer initialized from it (MMATE.from_attention). The rest of each layer, its
    norms and MLP, is the teacher's; which layer it is sets its windows and scan order (layer_pattern)."""
    for layer in layers:
        layer.self_attn = MMATE.from_attention(layer.self_attn, d_model, mixer, eps)
