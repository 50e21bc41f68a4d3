"""The speed layer: everything here exists only for speed, and the model is complete without it.

linmu.py and smolvlm.py compute each prompt whole and plainly; this module makes the same
computation fast on a given device, and each of its paths is tested equal to the plain one:

  * Tuning: the per-device settings (how long a prompt's pieces are, how Flex-MA's scan is
    chunked), applied to a model by tune(); the numbers behind them are in RESULTS.md, "Device
    settings";
  * pieces: on a CPU, a long prompt is worked through a piece of tokens at a time, by piecewise
    subclasses of the model's modules that tune() swaps in (the same parameters, the same results);
  * fused layers: on a GPU, fused subclasses that tune() swaps in, with one input projection per
    mixer and MLP, for the teacher and the student alike;
  * compile_model: torch.compile of every layer, one graph for every prompt length;
  * decoder: the decoding step recorded once as a CUDA graph, then replayed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.fx.experimental._config
import torch.nn.functional as F
from torch import Tensor, nn

from linmu import (MMATE, Chunking, FlexMA, FlexMACache, FlexPrompt, LocalSwin, MMATECache, PromptPlan, Windows,
                   apply_rotary, ssd_scan, window_attention)
from smolvlm import MLP, VLM, Attention, DecoderLayer, TextModel

# ----------------------------------------------------------------------------------------------
# Per-device settings


@dataclass(frozen=True)
class Tuning:
    """How a model works through a prompt on one kind of device. It changes speed and memory, never
    the result beyond rounding, so it belongs to the machine, not to the model.

    piece_tokens: the prompt is worked through this many tokens at a time, None for all at once. A
      CPU wants small pieces, whose temporaries stay in its caches; a GPU wants the whole prompt, a
      few large kernels per layer instead of many small ones.
    chunking: the SSD scan's chunk length and block of chunks (linmu.Chunking). A GPU takes the
      longer chunk for its lower peak memory, a CPU the shorter for speed.
    fused: the decoder's projections fused (see "Fused layers" below), for whole prompts only. The
      fused weights are computed from the parameters when tune() runs and get no gradient: a model
      that trains is tuned unfused (distill.py's student), one that does not is fused where it runs
      whole prompts (the teacher, generation, bench.py).
    The values of TUNING are measured: RESULTS.md, "Device settings".
    """

    piece_tokens: int | None
    chunking: Chunking
    fused: bool = False

    def __post_init__(self):
        if self.fused and self.piece_tokens is not None:
            raise ValueError("fused layers read whole prompts: a Tuning with piece_tokens is not fused")


TUNING = {"cpu": Tuning(piece_tokens=2048, chunking=Chunking(chunk_size=32, chunks_per_block=8)),
          "cuda": Tuning(piece_tokens=None, chunking=Chunking(chunk_size=128, chunks_per_block=16), fused=True)}


def tuning_for(device: torch.device) -> Tuning:
    """The settings for a device: CUDA's on CUDA, the CPU's elsewhere."""
    return TUNING["cuda" if device.type == "cuda" else "cpu"]


def tune(model: nn.Module, tuning: Tuning) -> nn.Module:
    """Apply a device's settings to a model (a VLM, or any module holding the model's parts), in place.

    Its decoder's scans take tuning.chunking; with tuning.piece_tokens, each FlexMA, LocalSwin, MMATE
    and DecoderLayer becomes its piecewise subclass below, with tuning.fused each MLP, Attention and
    M-MATE layer (both branches) its fused subclass, and otherwise the plain class again: the same
    parameters and state_dict whatever the class. Fused weights are made when tune() runs: tune after
    moving the model to its device and dtype (which copies parameters and buffers apart)."""
    for module in model.modules():
        if isinstance(module, TextModel):
            module.chunking = tuning.chunking
        plain = PLAIN.get(type(module), type(module))
        for name in getattr(module, "fused_buffers", ()):  # a previous tuning's fused weights
            delattr(module, name)
        if tuning.fused and plain in FUSED and getattr(module, "branches", "both") == "both":
            module.__class__ = FUSED[plain]
            module.fuse()
        elif plain in PIECEWISE or plain in FUSED:
            module.__class__ = PIECEWISE[plain] if tuning.piece_tokens is not None and plain in PIECEWISE else plain
            module.piece_tokens = tuning.piece_tokens
    return model


# ----------------------------------------------------------------------------------------------
# A CPU's pieces


def pieces(length: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` covering range(length), one at least.

    Working through a long prompt a piece at a time, each piece continuing from where the previous
    one ended, gives the same result as one pass, with temporaries that do not grow with the
    prompt. On a CPU that is most of the speed: a piece's temporaries stay in cache and are reused
    by the allocator, where whole-prompt temporaries are fresh memory, paged in on every call."""
    count = max(1, -(-length // size))  # the pieces; under torch.compile a guard on this count, not on the length
    return [slice(i * size, (i + 1) * size) for i in range(count - 1)] + [slice((count - 1) * size, length)]


def in_pieces(fn, size: int, *xs: Tensor) -> Tensor | tuple[Tensor, ...]:
    """fn(*xs) for a function that treats every token alone (norms, MLPs, gates, projections):
    xs (B, L, ...), `size` tokens at a time, so that only the result (a tensor, or a tuple of them
    if fn returns one) spans the whole prompt."""
    spans = pieces(xs[0].shape[1], size)
    if len(spans) == 1:
        return fn(*xs)
    outputs = [fn(*(x[:, piece] for x in xs)) for piece in spans]
    if isinstance(outputs[0], Tensor):
        return torch.cat(outputs, dim=1)
    return tuple(torch.cat(parts, dim=1) for parts in zip(*outputs))


class PiecewiseFlexMA(FlexMA):
    """FlexMA whose scans and output gate work through the prompt piece_tokens at a time."""

    piece_tokens: int

    def _scan(self, xBC: Tensor, dt: Tensor, prompt: FlexPrompt, chunking: Chunking) -> tuple[Tensor, Tensor]:
        """FlexMA._scan a piece at a time. The backward direction's pieces are the forward pieces'
        mirror images, so that each piece of both directions is one scan, as in the plain pass.
        Each piece reads the K - 1 conv inputs before it in scan order (zeros before the first
        token) and starts from the state its direction's previous piece ended in."""
        batch, length, _ = xBC.shape
        visual, real = prompt.visual, prompt.reads[:batch]  # (B, L, 1): the forward direction's
        weight, bias = self._convolutions(visual is not None)
        K = weight.shape[-1]
        A = -self.A_log.exp()
        y, state = xBC.new_zeros(batch, length, self.heads, self.head_dim), None  # both directions add into y
        for piece in pieces(length, self.piece_tokens):
            n = piece.stop - piece.start
            inputs, d = [xBC[:, max(0, piece.start - (K - 1)):piece.stop]], [dt[:, piece] * real[:, piece]]
            if visual is not None:  # the mirror piece and the K - 1 after it, reversed; text: no input, no decay
                mirror = slice(length - piece.stop, length - piece.start)
                after = slice(mirror.start, mirror.stop + K - 1)  # clipped at the sequence's end
                inputs.append((xBC[:, after] * visual[:, after, None]).flip(1))
                d.append((dt[:, mirror] * visual[:, mirror, None]).flip(1))
            inputs = torch.cat([F.pad(t, (0, 0, K - 1 + n - t.shape[1], 0)) for t in inputs])  # (d B, K - 1 + n, C)
            x, B, C = self._features(inputs, weight, bias)
            del inputs  # freed before the scan's temporaries
            out, state = ssd_scan(x, torch.cat(d), A, B, C, chunking.chunk_size, chunking.chunks_per_block,
                                  state, prompt.exclusive)  # (d B, n, H, P)
            y[:, piece].add_(out[:batch]).addcmul_(self.D[:, None], x[:batch])
            if visual is not None:  # back in the original order, to visual tokens only
                y[:, mirror].addcmul_(out[batch:].flip(1), visual[:, mirror, None, None])
        return y, state[:batch]

    def _output(self, y: Tensor, z: Tensor) -> Tensor:
        return in_pieces(super()._output, self.piece_tokens, y, z)


class PiecewiseLocalSwin(LocalSwin):
    """LocalSwin whose projections, and whose windows' attention, work piece_tokens queries at a time."""

    piece_tokens: int

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return in_pieces(super().qkv, self.piece_tokens, x, cos, sin)

    def attend(self, q: Tensor, k: Tensor, v: Tensor, windows: Windows) -> Tensor:
        per_piece = max(1, self.piece_tokens // windows.queries.shape[1])  # windows
        return torch.cat([window_attention(q, k, v, Windows(windows.queries[piece], windows.keys[piece],
                                                             windows.mask[piece], windows.writes[piece]))
                          for piece in pieces(len(windows.queries), per_piece)])


class PiecewiseMMATE(MMATE):
    """MMATE whose gate mixes its branches piece_tokens at a time."""

    piece_tokens: int

    def _gated_sum(self, x: Tensor, flex: Tensor, swin: Tensor) -> Tensor:
        return in_pieces(super()._gated_sum, self.piece_tokens, x, flex, swin)


class PiecewiseDecoderLayer(DecoderLayer):
    """DecoderLayer whose norm and feed-forward work piece_tokens at a time."""

    piece_tokens: int

    def forward(self, h: Tensor, plan) -> tuple[Tensor, object]:
        y, cache = self.self_attn(in_pieces(self.input_layernorm, self.piece_tokens, h), plan)
        return in_pieces(self._feed_forward, self.piece_tokens, h, y), cache


PIECEWISE = {FlexMA: PiecewiseFlexMA, LocalSwin: PiecewiseLocalSwin, MMATE: PiecewiseMMATE,
             DecoderLayer: PiecewiseDecoderLayer}


# ----------------------------------------------------------------------------------------------
# Fused layers: fewer and larger kernels per layer, for the teacher and the student alike


def share(module: nn.Module, name: str, parts: list[Tensor], dim: int = 0) -> None:
    """Register on module the non-persistent buffer `name`, the tensors `parts` concatenated along
    dim, and make each part that is a parameter a view of it: the fused weight and the parameters
    are one copy of the weights, the checkpoint still holds the parameters under their own names,
    and a checkpoint loaded into them is the fused weight too."""
    whole = torch.cat([part.detach() for part in parts], dim)
    for part, view in zip(parts, whole.split([part.shape[dim] for part in parts], dim)):
        if isinstance(part, nn.Parameter):
            part.data = view
    module.register_buffer(name, whole, persistent=False)


def rotate_qkv(qkv: Tensor, heads: int, kv_heads: int, head_dim: int, cos: Tensor,
               sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """One projection's [q | k | v] (B, n, (H + 2 Hkv) Dh) -> q (B, n, H, Dh), k and v (B, n, Hkv, Dh),
    RoPE on q and k in one pass (AttentionProjections.qkv)."""
    qk, v = qkv.unflatten(-1, (heads + 2 * kv_heads, head_dim)).split([heads + kv_heads, kv_heads], dim=2)
    q, k = apply_rotary(qk, cos, sin).split([heads, kv_heads], dim=2)
    return q, k, v


class FusedMLP(MLP):
    """The MLP with gate_proj and up_proj as one matmul."""

    fused_buffers = ("gate_up",)

    def fuse(self) -> None:
        share(self, "gate_up", [self.gate_proj.weight, self.up_proj.weight])

    def forward(self, x: Tensor) -> Tensor:
        gate, up = F.linear(x, self.gate_up).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class FusedAttention(Attention):
    """The teacher's attention with q_proj, k_proj and v_proj as one matmul (gpt-fast's wqkv)."""

    fused_buffers = ("wqkv",)

    def fuse(self) -> None:
        share(self, "wqkv", [self.q_proj.weight, self.k_proj.weight, self.v_proj.weight])

    def qkv(self, x: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        return rotate_qkv(F.linear(x, self.wqkv), self.num_heads, self.num_kv_heads, self.head_dim, cos, sin)


class FusedMMATE(MMATE):
    """M-MATE with one input and one output projection.

    Both branches read the same input, so one matmul gives all they and the gate read:
    [z | x B C | dt | q k v | gate logit], with z_bias, dt_bias and the gate's bias as its bias.
    The gate then folds into one output projection, exactly:
        g * out_proj(a) + (1 - g) * o_proj(b) = [out_proj | o_proj] @ [g a ; (1 - g) b].
    Flex-MA's scan, Local-Swin's windows and ring are the plain modules' own code; the decoding
    step's recurrence is written here with few operations (FlexMA.step is its reference).
    """

    fused_buffers = ("w_in", "b_in", "w_out", "A", "D")

    def fuse(self) -> None:
        flex, swin = self.flex, self.swin
        qkv = swin.q_proj.weight, swin.k_proj.weight, swin.v_proj.weight
        share(self, "w_in", [flex.in_proj.weight, *qkv, self.gate.weight])
        share(self, "b_in", [flex.z_bias, flex.z_bias.new_zeros(flex.conv_dim), flex.dt_bias,
                             flex.z_bias.new_zeros(sum(w.shape[0] for w in qkv)), self.gate.bias])
        share(self, "w_out", [flex.out_proj.weight, swin.o_proj.weight], dim=1)
        self.register_buffer("A", -flex.A_log.detach().exp()[:, None, None], persistent=False)  # (H, 1, 1)
        self.register_buffer("D", flex.D.detach()[:, None, None], persistent=False)  # (H, 1, 1), a view of flex.D

    def _project(self, x: Tensor) -> tuple[Tensor, ...]:
        """x (B, n, D) -> z, xBC, dt (softplus'ed), qkv and the gate g, each (B, n, ...)."""
        flex, swin = self.flex, self.swin
        sizes = [flex.d_inner, flex.conv_dim, flex.heads, (swin.num_heads + 2 * swin.num_kv_heads) * swin.head_dim, 1]
        z, xBC, dt, qkv, gate = F.linear(x, self.w_in, self.b_in).split(sizes, dim=-1)
        return z, xBC, F.softplus(dt), qkv, torch.sigmoid(gate)

    def _mix(self, z: Tensor, y: Tensor, attention: Tensor, g: Tensor) -> Tensor:
        """Flex-MA's output gate and norm (FlexMA._output before out_proj), then both branches'
        output projections and the gate as one matmul: y (B, n, H, P), z (B, n, H P), attention
        (B, n, H Dh), g (B, n, 1) -> (B, n, D)."""
        flex = self.flex
        normed = flex.norm(y * F.silu(z).unflatten(-1, (flex.heads, flex.head_dim))).flatten(2)
        return F.linear(torch.cat([normed * g, attention * (1 - g)], dim=-1), self.w_out)

    def forward(self, x: Tensor, plan: PromptPlan) -> tuple[Tensor, MMATECache]:
        flex, swin = self.flex, self.swin
        z, xBC, dt, qkv, g = self._project(x)
        if plan.scan is not None:  # Flex-MA reads the prompt in this layer's Rotary Major-Scan order
            xBC, dt = (t.flatten(0, 1)[plan.scan[0]] for t in (xBC, dt))
        y, ssm = flex._scan(xBC, dt, plan.flex, plan.chunking)  # (B, L, H, P)
        if plan.scan is not None:
            y = y.flatten(0, 1)[plan.scan[1]]  # back in the prompt's order
        attention, ring = swin.attend_windows(*rotate_qkv(qkv, swin.num_heads, swin.num_kv_heads, swin.head_dim,
                                                          *plan.rope), plan.windows)
        return self._mix(z, y, attention, g), MMATECache(FlexMACache(flex.conv_state(xBC, plan.flex), ssm), ring)

    def step(self, x: Tensor, rope: tuple[Tensor, Tensor], position: Tensor, cache: MMATECache) -> Tensor:
        flex, swin, state = self.flex, self.swin, cache.flex
        z, xBC, dt, qkv, g = self._project(x)  # (B, 1, ...)
        window = torch.cat([state.conv, xBC.mT], dim=-1)  # (B, C, K)
        state.conv.copy_(window[..., 1:])
        acc = state.ssm.dtype  # the scan's accumulation precision
        features = F.silu(flex.conv_forward(window)).to(acc).view(-1, 3, flex.heads, 1, flex.head_dim)
        row, B, C = features.unbind(1)  # (B, H, 1, P), (B, H, 1, N) twice
        x_, dt = row.mT, dt.to(acc).view(-1, flex.heads, 1, 1)  # (B, H, P, 1), (B, H, 1, 1)
        state.ssm.mul_(torch.exp(dt * self.A)).addcmul_(x_ * dt, B)  # (B, H, P, N)
        y = torch.addcmul((state.ssm * C).sum(-1, keepdim=True), self.D, x_)  # (B, H, P, 1)
        attention = swin.attend_ring(*rotate_qkv(qkv, swin.num_heads, swin.num_kv_heads, swin.head_dim, *rope),
                                     position, cache.swin)
        return self._mix(z, y.to(x.dtype).movedim(-1, 1), attention, g)


FUSED = {MLP: FusedMLP, Attention: FusedAttention, MMATE: FusedMMATE}
PLAIN = {fast: plain for plain, fast in [*PIECEWISE.items(), *FUSED.items()]}


# ----------------------------------------------------------------------------------------------
# Decoding as a CUDA graph, and torch.compile


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
    """model.step on these caches as a function (token (B,), position (B,)) -> logits (B, V):
    eager on the CPU (the reference), a CUDA graph on CUDA."""
    step = lambda token, position: model.step(token, position, caches)
    return CUDAGraphStep(step) if next(model.parameters()).device.type == "cuda" else step


def compile_model(model: VLM, backend: str = "inductor") -> None:
    """torch.compile what runs most: every vision and decoder layer, and each decoder layer's decoding step.

    Each is compiled whole (fullgraph: a graph break is an error) with dynamic shapes, so one
    compilation serves prompts of every length: a layer reads only tensors and the PromptPlan,
    and never waits on the host. The layers of a model share their compiled code, since what
    differs between them is data (PromptPlan): compiling costs seconds per graph, not per layer. A
    student's prefill has a graph for visual prompts and one for text-only prompts; every step one.
    The decoding step is compiled layer by layer for that reason (compiled whole, 30 layers' steps
    make one graph, slow to compile: RESULTS.md, "Compile"). On CUDA the step around them is then
    recorded as a CUDA graph (decoder).
    On a CPU, whose pieces (Tuning) are a loop that dynamo unrolls, each kind of prompt has a graph
    per number of pieces, and dynamo allows 8 graphs per function: a student's visual and text-only
    prompts compile up to four pieces (8,192 tokens) each, and then fail (fullgraph).
    backend: torch.compile's (the tests trace the same graphs with "aot_eager", which generates no code)."""
    compile_layers([*model.model.vision_model.encoder.layers, *model.model.text_model.layers], backend)
    for layer in model.model.text_model.layers:
        layer.step = torch.compile(layer.step, fullgraph=True, dynamic=True, backend=backend)


def compile_for_distillation(student: VLM, teacher: VLM, backend: str = "inductor") -> None:
    """torch.compile what a distillation step runs, as compile_model does: the teacher's vision and decoder
    layers (inference) and the student's decoder layers (training); not the student's vision encoder,
    which never runs (the student reads the teacher's vision_states: the same frozen weights), nor
    decoding steps. The student's layers make a graph each for inputs with and without gradients (its
    stream past the first layer; the teacher's hidden states), for each kind of prompt (compile_model)."""
    compile_layers([*teacher.model.vision_model.encoder.layers, *teacher.model.text_model.layers,
                    *student.model.text_model.layers], backend)


def compile_layers(layers: list[nn.Module], backend: str) -> None:
    """Compile each module whole (fullgraph) with dynamic shapes."""
    # No duck sizing: sizes equal in the first prompt compiled (an image's 16-token Swin windows and
    # the 16-query text blocks) would be assumed equal from then on, and any other prompt recompile.
    torch.fx.experimental._config.use_duck_shape = False
    for layer in layers:
        layer.compile(fullgraph=True, dynamic=True, backend=backend)


