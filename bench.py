"""Time-to-first-token and decoding speed: the LinMU student against its attention teacher.

    python bench.py                                   # this device's default sweep, random weights
    python bench.py --model checkpoints/linmu-smolvlm2-256m --json bench.json

The teacher is SmolVLM2 with its decoder self-attention computed by PyTorch's
scaled_dot_product_attention (flash / memory-efficient kernels where the device has them); the
student is the same model with every decoder self-attention replaced by an M-MATE layer
(smolvlm.convert_to_linmu). Both have the same dims (by default SmolVLM2-256M's, from
configs/smolvlm2-256m.json) and random weights: timing does not depend on the values.

Workloads are prompts of SmolVLM2's shape: a chat prefix, the visual tokens (each frame or tile
preceded by its text marker, as the processor writes them: "Frame from 00:12:", "<row_1_col_2>"),
then the question. Per workload and model:

  * prefill: the decoder reading the prompt (synthetic token ids, random visual embeddings in
    place of the connector's output, the right grids) up to the first generated token; this is
    the part LinMU changes, and what lets a CPU reach long videos;
  * the vision encoder and connector on random 512x512 frames, timed once per workload (the
    student keeps the teacher's: the same module, the same time), for workloads with at most
    --vision-frames frames; TTFT is its time plus the prefill's;
  * decoding: generated tokens per second over --new-tokens greedy steps after the prefill, at
    batch 1 and at each size of --batch (the batch-1 prefill's caches repeated, as identical prompts
    give), through speed.decoder: fixed-size caches written in place, replayed as a CUDA graph on
    CUDA for both models (the first step, which records the graph, is not timed); a batch whose
    caches, beside the batch-1 prefill's, exceed --memory-budget-mib is not run: "does not fit";
  * peak memory of the prefill: on CUDA torch.cuda.max_memory_allocated above what was allocated
    before; on CPU the growth of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) above its resident set before.

Each model is also set against its own limit. Its prefill's work is counted from the sizes and the
prompt's layout (prefill_flops: the matmul FLOPs, as torch's FlopCounterMode counts them), and so
is the traffic of a decoding step (step_bytes: the weights, and the caches read and written);
the rates reached, TFLOP/s and GB/s, are then compared with the card's peak (configs/cards.json,
or --peak-tflops and --peak-gbs; never guessed), and the FLOP and byte ratios of the two models,
the speedups equal rates would give, with the speedups measured.

Then, apart from the model, one decoder layer's mixer alone (the teacher's first attention layer
against the student's first M-MATE layer, eager) on the visual tokens of videos of
--mixer-lengths tokens: the part LinMU replaces, without the MLP and the rest of the model,
which cost both the same.

Token ids, embeddings, frames and layouts are prepared outside the timed regions; each number is
the median of --repeats runs after --warmup untimed runs, with CUDA synchronized around them. With
--variants compile, speed.compile_model compiles every decoder and vision layer and the decoding
step; the compile time (the warm-up runs less as many timed runs) is reported on its own, never
inside a timing. Every row is printed as soon as it is measured, and --json is rewritten after
each, so an interrupted run keeps what it measured.

With --profile WORKLOAD, nothing is timed: torch.profiler records the first decoder layer of each
model on that workload, its prefill and one decoding step, and prints the top operations by
self device time (CPU time on a CPU); --json then names a folder for the Chrome traces.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import statistics
import time
from dataclasses import dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import torch
from torch import Tensor
from tqdm import tqdm

from cli import InputError, check_bounds, check_device, user_errors, write_json
import flops
from linmu import PromptPlan, TokenLayout
from smolvlm import VLM, VLMConfig, check_checkpoint, convert_to_linmu, load_model, resolve_checkpoint
from speed import Tuning, compile_model, decoder, tune, tuning_for

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "smolvlm2-256m.json"
PREFIX_TOKENS, QUESTION_TOKENS = 16, 8  # chat template and system text before, the question after
FRAME_MARKER_TOKENS, TILE_MARKER_TOKENS = 10, 2  # "\nFrame from MM:SS:<fake><global-img>", "<fake><row_i_col_j>"
MODELS = ("attention", "linmu")

# Per-device defaults: a CPU runs 2 decoder layers (every layer costs the same, so the per-layer
# ratio is the model's), past the crossover and still short; a GPU runs the
# whole model from one image to videos of 17 minutes (1024 frames, about 75k tokens).
DEFAULTS = {
    "cpu": dict(frames="16,64,128,256", lengths="4096,16384", mixer_lengths="4096,8192,16384,32768", layers=2,
                vision_frames=1, new_tokens=16, batch="8", variants="eager"),
    "cuda": dict(frames="16,64,256,512,1024", lengths="8192,32768,65536", mixer_lengths="16384,65536,131072",
                 layers=0, vision_frames=1024, new_tokens=32, batch=None, variants="eager,compile"),
}  # cuda's batch None: default_batches, from the memory free and what the teacher's cache needs


# ----------------------------------------------------------------------------------------------
# Workloads


@dataclass
class Workload:
    """One prompt: `grids` are its visual grids in order, (frames, rows, cols) each; `text` its text-only length."""

    name: str
    grids: list[tuple[int, int, int]]
    markers: int = 0  # text tokens before each frame or tile
    text: int = 0  # for a text-only prompt: its length

    @property
    def frames(self) -> int:
        return sum(f for f, _, _ in self.grids)

    @property
    def visual_tokens(self) -> int:
        return sum(f * r * c for f, r, c in self.grids)

    @property
    def tokens(self) -> int:
        if not self.grids:
            return self.text
        return PREFIX_TOKENS + self.visual_tokens + self.markers * self.frames + QUESTION_TOKENS

    def input_ids(self, config: VLMConfig, generator: torch.Generator) -> Tensor:
        """(1, tokens) synthetic ids: random text ids, image_token_id for every visual token."""
        vocab, image = config.text.vocab_size, config.image_token_id
        text = lambda n: (image + 1 + torch.randint(vocab - 1, (n,), generator=generator)) % vocab  # never image
        if not self.grids:
            return text(self.text)[None]
        per_frame = lambda r, c: [text(self.markers), torch.full((r * c,), image)]
        pieces = [text(PREFIX_TOKENS)] + [p for f, r, c in self.grids for _ in range(f) for p in per_frame(r, c)]
        return torch.cat(pieces + [text(QUESTION_TOKENS)])[None]


def workloads(config: VLMConfig, tiles: tuple[int, int] | None, frames: list[int],
              lengths: list[int]) -> list[Workload]:
    """One image, a high-resolution image cut into tiles plus its global image, videos at 1 fps, text-only lengths."""
    side = math.isqrt(config.image_seq_len)
    image = (1, side, side)
    loads = [Workload("image", [image], TILE_MARKER_TOKENS)]
    if tiles is not None:
        rows, cols = tiles
        loads.append(Workload(f"hi-res {rows}x{cols}+1", [image] * (rows * cols + 1), TILE_MARKER_TOKENS))
    loads += [Workload(f"video {n} s", [(n, side, side)], FRAME_MARKER_TOKENS) for n in frames]
    loads += [Workload(f"text {n}", [], text=n) for n in lengths]
    return loads


# ----------------------------------------------------------------------------------------------
# Models


def decoder_layers(model: VLM):
    return model.model.text_model.layers


def keep_layers(model: VLM, layers: int) -> VLM:
    """Keep the first `layers` decoder layers (all when 0)."""
    total = len(decoder_layers(model))
    if layers > total:
        raise InputError(f"--layers {layers} but the model has {total} decoder layers")
    if layers:
        model.model.text_model.layers = decoder_layers(model)[:layers]
    return model


@user_errors("bench.py")
def build_models(args, device: torch.device, dtype: torch.dtype) -> tuple[VLM, VLM, str]:
    """The (teacher, student) pair the flags describe, in eval mode on the device, and where they came from."""
    for flag, kind in (("model", "student"), ("teacher", "teacher")):  # both, before either is loaded
        if getattr(args, flag) is not None:
            check_checkpoint(resolve_checkpoint(getattr(args, flag)), expect=kind)
    if args.model is not None:
        student = load_model(args.model, device, dtype)
        config = replace(student.config, linmu=None)
        source = f"student {args.model}"
    else:
        try:
            config = VLMConfig.from_hf_dict(json.loads(Path(args.config).read_text()))
        except (OSError, json.JSONDecodeError, TypeError, ValueError) as error:
            raise InputError(f"--config {args.config}: {error}") from None
        if config.linmu is not None:
            raise InputError(f"--config {args.config} describes a LinMU student: give the "
                             "teacher's config, or the student's checkpoint directory as --model")
        student, source = None, f"random weights, {Path(args.config).name}"
    if args.teacher is not None:
        teacher = load_model(args.teacher, device, dtype)
        source += f", teacher {args.teacher}"
    else:
        torch.manual_seed(0)
        with torch.device(device):
            teacher = VLM(config).to(dtype)
    teacher = keep_layers(teacher.eval(), args.layers)
    student = keep_layers(student.eval(), args.layers) if student is not None else convert_to_linmu(teacher).eval()
    return tune(teacher, tuning_for(device)), tune(student, tuning_for(device)), source


def repeat_batch(cache, batch: int):
    """A batch-1 decoding cache (tensors in dataclasses and lists) repeated to `batch` sequences (a copy)."""
    if isinstance(cache, Tensor):
        return cache.repeat(batch, *[1] * (cache.dim() - 1))
    if isinstance(cache, list):
        return [repeat_batch(c, batch) for c in cache]
    if is_dataclass(cache):
        return replace(cache, **{f.name: repeat_batch(getattr(cache, f.name), batch) for f in fields(cache)})
    return cache


def cache_bytes(cache) -> int:
    if isinstance(cache, Tensor):
        return cache.numel() * cache.element_size()
    if isinstance(cache, list):
        return sum(cache_bytes(c) for c in cache)
    return sum(cache_bytes(getattr(cache, f.name)) for f in fields(cache)) if is_dataclass(cache) else 0


# ----------------------------------------------------------------------------------------------
# Limits: the work of a prefill and the traffic of a decoding step, counted from the sizes


def prefill_flops(config: VLMConfig, layers: int, load: Workload, settings: Tuning) -> dict[str, int]:
    """The matmul work of bench's prefill, by part (flops.decoder_flops): `layers` decoder layers over the
    workload's prompt, the head at its last token."""
    visual = load.input_ids(config, torch.Generator())[0] == config.image_token_id
    return flops.decoder_flops(config, layers, visual, load.grids, settings, head_tokens=1)


@dataclass
class StepBytes:
    """The traffic of one decoding step, in bytes, moving each byte once (a fused step's; eager kernels move
    more): `weights`, read once a step whatever the batch, and `per_sequence`, a sequence's caches read and
    what changes of them written; `cache` is a sequence's caches held."""

    weights: int
    per_sequence: int
    cache: int

    def at(self, batch: int) -> int:
        return self.weights + batch * self.per_sequence


def step_bytes(config: VLMConfig, layers: int, slots: int, dtype: torch.dtype) -> StepBytes:
    """A decoding step of `layers` decoder layers, weights and caches in `dtype`, the teacher's cache holding
    `slots` tokens (the prompt and the room for the new ones).

    The teacher reads its whole KV cache (the kernel reads every slot, masked or not) and writes one
    slot; the student reads and rewrites Flex-MA's state (the last conv inputs, and the SSM state in
    float32) and reads Local-Swin's ring of text_window slots, writing one. The weights are those of
    every decoder layer that a step uses (not Flex-MA's backward convolution), the final norm and the
    head; the embedding rows of the batch's tokens are left out (D values a sequence)."""
    text, mixer, size = config.text, config.linmu, dtype.itemsize
    D, H, kv, Dh = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim
    qkvo = D * (H + 2 * kv) * Dh + H * Dh * D
    weights = 3 * D * text.intermediate_size + 2 * D  # the MLP and the layer's two norms
    slot = 2 * kv * Dh * size  # a token's key and value
    if mixer is None:
        weights, cache, moved = weights + qkvo, slots * slot, slots * slot + slot
    else:
        flex, swin = mixer.branches != "swin", mixer.branches != "flex"
        cache = moved = 0
        if flex:
            conv_dim, K = 3 * H * Dh, mixer.conv_kernel
            # in_proj, z_bias, conv_forward and its bias, dt_bias, A_log, D, the per-head norm, out_proj
            weights += D * (H * Dh + conv_dim + H) + H * Dh + conv_dim * (K + 1) + 3 * H + Dh + H * Dh * D
            state = conv_dim * (K - 1) * size + H * Dh * Dh * torch.promote_types(dtype, torch.float32).itemsize
            cache, moved = cache + state, moved + 2 * state
        if swin:
            ring = mixer.text_window * slot
            weights, cache, moved = weights + qkvo, cache + ring, moved + ring + slot
        if flex and swin:
            weights += D + 1  # the gate
    head = (D + D * text.vocab_size) * size  # the final norm and lm_head
    return StepBytes(layers * weights * size + head, layers * moved, layers * cache)


def peak_rates(args, device: torch.device, dtype: torch.dtype) -> dict:
    """The device's peak TFLOP/s (dense, for dtype) and memory GB/s, None where not known, and a line saying where they
    come from: --peak-tflops and --peak-gbs, else configs/cards.json's entry for a CUDA card (its bfloat16 figure, so
    TFLOP/s for bfloat16 only); a CPU has none unless the flags give them."""
    entry = flops.device_peak(device)
    tflops, tflops_from = ((args.peak_tflops, "--peak-tflops") if args.peak_tflops else
                           (entry[0]["tflops"], entry[1]) if entry and dtype == torch.bfloat16 else (None, None))
    gbs, gbs_from = ((args.peak_gbs, "--peak-gbs") if args.peak_gbs else
                     (entry[0]["gbs"], entry[1]) if entry else (None, None))
    if tflops is None and gbs is None:
        line = "peak unknown: pass --peak-tflops/--peak-gbs"
    else:
        line = "peak " + ", ".join([f"{tflops:g} TFLOP/s ({tflops_from})" if tflops else
                                    "TFLOP/s unknown: pass --peak-tflops",
                                    f"{gbs:g} GB/s ({gbs_from})" if gbs else "GB/s unknown: pass --peak-gbs"])
    return {"tflops": tflops, "gbs": gbs, "line": line}


def free_memory(device: torch.device) -> int | None:
    """Bytes free on the device now: CUDA's free memory and what PyTorch's allocator holds unused, or a CPU's
    MemAvailable; None where the platform does not say."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    meminfo = Path("/proc/meminfo")
    found = re.search(r"^MemAvailable:\s+(\d+) kB", meminfo.read_text(), re.M) if meminfo.is_file() else None
    return int(found.group(1)) * 1024 if found else None


def most_sequences(per_sequence: int, budget: float) -> int:
    """The largest decoding batch whose caches fit the budget (bytes) beside the batch-1 prefill's, which stay
    alive: (batch + 1) x per_sequence bytes."""
    return int(budget // per_sequence) - 1


def default_batches(most: int) -> list[int]:
    """Decoding batch sizes up to `most`: powers of two from 8 below it, then `most` (at least 2)."""
    sizes = []
    while 8 * 2 ** len(sizes) < most:
        sizes.append(8 * 2 ** len(sizes))
    return sizes + [max(2, most)]


# ----------------------------------------------------------------------------------------------
# What is timed


def greedy(logits: Tensor, image_token_id: int) -> Tensor:
    """logits (B, V) -> the most likely tokens (B,), never the image placeholder (random weights may favour it)."""
    logits = logits.clone()
    logits[:, image_token_id] = -math.inf
    return logits.argmax(-1)


@torch.no_grad()
def prefill(model: VLM, input_ids: Tensor, grids: list, image_features: Tensor | None,
            new_tokens: int) -> tuple[Tensor, list]:
    """The prompt through the decoder to the first generated token (greedy) and the decoding caches.

    VLM.forward without the images' encoding, and with the head at the last position only: the
    logits of the prompt's other positions are not needed to generate.
    """
    h = model.embed(input_ids, image_features)
    layout = TokenLayout.build(input_ids, model.config.image_token_id, grids)
    h, caches, _ = model.model.text_model(h, layout, new_tokens)
    return greedy(model.lm_head(h[:, -1]), model.config.image_token_id), caches


@torch.no_grad()
def decode(step, token: Tensor, start: int, steps: int, image_token_id: int) -> Tensor:
    """`steps` greedy decoding steps (speed.decoder: a CUDA graph on CUDA) from position `start` -> the last token.
    Nothing here waits on the device: the position advances on it."""
    position = torch.full_like(token, start)  # (B,): the batch's prompts are one prompt repeated
    for _ in range(steps):
        token = greedy(step(token, position), image_token_id)
        position += 1
    return token


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def resident_kib(key: str) -> int:
    """A line of /proc/self/status, in KiB: VmRSS (resident now) or VmHWM (peak since the last reset)."""
    return int(re.search(rf"^{key}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.M).group(1))


class PeakMemory:
    """Peak memory a block of code adds, in bytes (None where the platform cannot tell): see the module docstring."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cpu = device.type == "cpu" and os.access("/proc/self/clear_refs", os.W_OK)
        self.bytes = None

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.before = torch.cuda.memory_allocated(self.device)
        elif self.cpu:
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
            self.before = resident_kib("VmRSS")
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            self.bytes = torch.cuda.max_memory_allocated(self.device) - self.before
        elif self.cpu:
            # a page read after the reset can make it -4 KiB
            self.bytes = max(0, resident_kib("VmHWM") - self.before) * 1024


@dataclass
class Timing:
    """Median seconds of the timed runs, the warm-up's extra seconds, peak memory of the first timed run."""

    seconds: float
    warmup_extra: float
    peak_bytes: int | None
    result: object = field(repr=False)


def measure(fn, device: torch.device, warmup: int, repeats: int) -> Timing:
    """Run fn() warmup times untimed (their duration less as many typical runs is reported as warm-up
    overhead: compilation), then `repeats` times, synchronized and timed."""
    synchronize(device)
    start = time.perf_counter()
    for _ in range(warmup):
        fn()
    synchronize(device)
    warm = time.perf_counter() - start
    times, peak = [], None
    for i in range(repeats):
        result = None  # the previous run's caches are not kept alive during this one
        with PeakMemory(device) as memory:
            synchronize(device)
            start = time.perf_counter()
            result = fn()
            synchronize(device)
            times.append(time.perf_counter() - start)
        peak = memory.bytes if i == 0 else peak
    median = statistics.median(times)
    return Timing(median, max(0.0, warm - warmup * median), peak, result)


def workload_inputs(load: Workload, config: VLMConfig, device: torch.device, dtype: torch.dtype):
    """The token ids, grids and random visual features of a workload (the same for both models: seeded)."""
    generator = torch.Generator().manual_seed(0)
    ids = load.input_ids(config, generator).to(device)
    images = load.visual_tokens // config.image_seq_len
    features = (torch.randn(images, config.image_seq_len, config.text.hidden_size, generator=generator)
                .to(device, dtype)
                if images else None)
    return ids, [load.grids], features


@torch.no_grad()
def bench_vision(model: VLM, load: Workload, args, device: torch.device) -> Timing:
    """The vision encoder and connector on the workload's frames or tiles: the same module, weights and
    time for both models (the student keeps the teacher's), so it is measured once."""
    side = model.config.vision.image_size
    images = load.visual_tokens // model.config.image_seq_len
    pixels = (torch.rand(images, 3, side, side, generator=torch.Generator().manual_seed(0)) * 2 - 1)
    pixels = pixels.to(device, model.lm_head.weight.dtype)
    return measure(lambda: model.encode_images(pixels), device, args.warmup, args.repeats)


def decode_batches(args) -> list[int]:
    """The decoding batch sizes: 1 (the latency) and those of --batch."""
    return sorted({1, *args.batch})


def bench_model(model: VLM, load: Workload, args, device: torch.device) -> dict:
    """The decoder measurements of one model on one workload: prefill, with its work and the FLOP rate reached,
    then decoding at each batch size: tokens/s, the traffic rate reached (step_bytes) and the caches held. A batch
    whose caches and the batch-1 prefill's exceed args.memory_budget_mib, or that runs out of memory, is not
    measured: its tokens/s is None ("does not fit")."""
    ids, grids, features = workload_inputs(load, model.config, device, model.lm_head.weight.dtype)
    image_token_id = model.config.image_token_id
    run = measure(lambda: prefill(model, ids, grids, features, args.new_tokens), device, args.warmup, args.repeats)
    token, caches = run.result
    layers = len(decoder_layers(model))
    work = sum(prefill_flops(model.config, layers, load, tuning_for(device)).values())
    traffic = step_bytes(model.config, layers, ids.shape[1] + args.new_tokens, model.lm_head.weight.dtype)
    row = dict(prefill_s=run.seconds, peak_mib=None if run.peak_bytes is None else run.peak_bytes / 2**20,
               cache_mib=cache_bytes(caches) / 2**20, warmup_extra_s=run.warmup_extra, prefill_flops=work,
               prefill_tflop_s=work / run.seconds / 1e12, step_weight_bytes=traffic.weights,
               step_sequence_bytes=traffic.per_sequence)
    per_sequence = cache_bytes(caches)
    most = None if args.memory_budget_mib is None else most_sequences(per_sequence, args.memory_budget_mib * 2**20)
    for batch in decode_batches(args):
        row[f"decode_cache_mib_b{batch}"] = batch * per_sequence / 2**20
        row[f"decode_tok_s_b{batch}"] = row[f"decode_gb_s_b{batch}"] = None
        if batch > 1 and most is not None and batch > most:
            continue
        try:
            step = decoder(model, repeat_batch(caches, batch) if batch > 1 else caches)  # `batch` identical prompts
            first = token.repeat(batch)
            started = time.perf_counter()
            step(first, torch.full_like(first, ids.shape[1]))  # on CUDA: records the CUDA graph
            synchronize(device)
            row["warmup_extra_s"] += time.perf_counter() - started
            run = measure(lambda: decode(step, first, ids.shape[1], args.new_tokens, image_token_id), device,
                          args.warmup, args.repeats)
        except torch.OutOfMemoryError:
            torch.cuda.empty_cache()
            continue
        finally:
            step = None  # its graph holds the batch's caches
        tokens_per_s = batch * args.new_tokens / run.seconds
        row[f"decode_tok_s_b{batch}"] = tokens_per_s
        row[f"decode_gb_s_b{batch}"] = traffic.at(batch) * tokens_per_s / batch / 1e9
        row["warmup_extra_s"] += run.warmup_extra
    return row


@torch.no_grad()
def bench_mixers(teacher: VLM, student: VLM, lengths: list[int], args, device: torch.device, bar: tqdm):
    """Layer 0's mixer of each model alone on the visual tokens of a video (whole frames, no text),
    the layout and PromptPlan built inside the timed call (the model's prefill builds them too): yields a row per
    length."""
    config = teacher.config
    side, per_frame = math.isqrt(config.image_seq_len), config.image_seq_len
    dtype = teacher.lm_head.weight.dtype
    mixers = {name: (decoder_layers(model)[0].self_attn, model.model.text_model.mixer)
              for name, model in zip(MODELS, (teacher, student))}
    for length in lengths:
        frames = max(1, length // per_frame)
        ids = torch.full((1, frames * per_frame), config.image_token_id, device=device)
        layout = lambda: TokenLayout.build(ids, config.image_token_id, [[(frames, side, side)]])
        rope = tuple(t.to(dtype) for t in teacher.model.text_model.rotary(layout().positions))
        chunking = student.model.text_model.chunking
        plan = lambda settings: PromptPlan.build(layout(), rope, settings, layers=1, chunking=chunking)[0]
        x = torch.randn(1, ids.shape[1], config.text.hidden_size, generator=torch.Generator().manual_seed(0))
        x = x.to(device, dtype)
        row = {"tokens": ids.shape[1], "frames": frames}
        for name, (mixer, settings) in mixers.items():
            bar.set_postfix_str(f"mixer alone, {ids.shape[1]} tokens, {name}")
            try:
                row[name] = measure(lambda: mixer(x, plan(settings)), device, args.warmup, args.repeats).seconds
            except torch.OutOfMemoryError:
                row[name] = None
                torch.cuda.empty_cache()
                tqdm.write(f"mixer alone, {ids.shape[1]} tokens: {name} ran out of memory (reported as '-')")
            bar.update()
        yield row


# ----------------------------------------------------------------------------------------------
# Profile

PROFILE_ROWS = 12  # operations a profile table shows


@torch.no_grad()
def profile_layer(model: VLM, name: str, load: Workload, device: torch.device, folder: Path | None) -> list[str]:
    """torch.profiler on the first decoder layer of a model: its prefill of the workload (the PromptPlan built
    before, as the decoder builds it before its layers), then one decoding step at the prompt's end, each after an
    untimed run. Returns, for each, a title and the table of its top operations by self device time (CPU time on
    a CPU); with a folder, writes each one's Chrome trace there, trace-<model>-<prefill|step>.json."""
    ids, grids, features = workload_inputs(load, model.config, device, model.lm_head.weight.dtype)
    text = model.model.text_model
    h = model.embed(ids, features)
    plan = text.plan(TokenLayout.build(ids, model.config.image_token_id, grids), h.dtype, new_tokens=1)[0]
    layer = decoder_layers(model)[0]
    position = torch.full((1,), ids.shape[1], device=device)
    rope = tuple(t.to(h.dtype) for t in text.rotary(position[None]))
    _, cache = layer(h, plan)
    phases = {"prefill": lambda: layer(h, plan), "step": lambda: layer.step(h[:, -1:], rope, position, cache)}
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    self_time = (lambda e: e.self_device_time_total) if device.type == "cuda" else (lambda e: e.self_cpu_time_total)
    lines = []
    for phase, run in phases.items():
        run()
        synchronize(device)
        with torch.profiler.profile(activities=activities) as profiler:
            run()
            synchronize(device)
        if folder is not None:
            profiler.export_chrome_trace(str(folder / f"trace-{name}-{phase}.json"))
        events = profiler.key_averages()
        total = sum(self_time(e) for e in events)
        top = sorted(events, key=self_time, reverse=True)[:PROFILE_ROWS]
        what = f"prefill of {load.name} ({load.tokens} tokens)" if phase == "prefill" else "one decoding step"
        lines += [f"{name}, first decoder layer, {what}: {total / 1e3:.3f} ms of self "
                  f"{'CUDA' if device.type == 'cuda' else 'CPU'} time, the top {len(top)} operations",
                  columns(["operation", "calls", "self ms", "%"],
                          [[e.key[:70], str(e.count), f"{self_time(e) / 1e3:.3f}", f"{100 * self_time(e) / total:.1f}"]
                           for e in top], left=1)]
    return lines


# ----------------------------------------------------------------------------------------------
# Reporting


def loglog_slope(tokens: list[int], seconds: list[float]) -> float:
    """Least-squares slope of log(seconds) against log(tokens): 1 for linear cost, 2 for quadratic."""
    x, y = [math.log(t) for t in tokens], [math.log(s) for s in seconds]
    mx, my = statistics.fmean(x), statistics.fmean(y)
    return sum((a - mx) * (b - my) for a, b in zip(x, y)) / sum((a - mx) ** 2 for a in x)


def scaling(rows: list[dict]) -> list[str]:
    """Log-log slopes of prefill time against tokens (successive pairs, and the longest three) and the crossover."""
    lines = []
    for series, pick in (("visual", lambda r: r["frames"] > 0), ("text-only", lambda r: r["frames"] == 0)):
        points = sorted((r for r in rows if pick(r) and all(r[m]["prefill_s"] for m in MODELS)),
                        key=lambda r: r["tokens"])
        if len(points) < 2:
            continue
        tokens = [r["tokens"] for r in points]
        for name in MODELS:
            seconds = [r[name]["prefill_s"] for r in points]
            pairs = " ".join(f"{loglog_slope(tokens[i:i + 2], seconds[i:i + 2]):.2f}" for i in range(len(points) - 1))
            last = loglog_slope(tokens[-3:], seconds[-3:])
            lines.append(f"  {series:9s} {name:9s} slope over the longest {min(3, len(points))} lengths: {last:.2f} "
                         f"(successive: {pairs})")
        faster = [r["linmu"]["prefill_s"] < r["attention"]["prefill_s"] for r in points]
        wins = next((i for i in range(len(points)) if all(faster[i:])), None)
        crossover = ("LinMU's prefill is not faster at any measured length" if wins is None
                     else f"LinMU's prefill is faster from {tokens[wins]} tokens on"
                     + (f" (attention faster at {tokens[wins - 1]})" if wins else " (every measured length)"))
        lines.append(f"  {series:9s} crossover: {crossover}")
    return lines


def fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None else f"{a / b:.2f}x"


def table_head(batch: int) -> list[str]:
    return ["workload", "variant", "tokens", "vision s", "prefill attn s", "LinMU s", "speedup", "TTFT attn s",
            "LinMU s", "speedup", "dec b1 attn tok/s", "LinMU", "speedup", f"dec b{batch} attn tok/s", "LinMU",
            "speedup", "peak attn MiB", "LinMU MiB"]


def table_cells(r: dict, batch: int) -> list[str]:
    """One workload and variant: the vision encoder, prefill, TTFT, decoding at batch 1 and `batch`, peak memory."""
    a, s = r["attention"], r["linmu"]
    dec = lambda b: [fmt(a.get(f"decode_tok_s_b{b}"), ".1f"), fmt(s.get(f"decode_tok_s_b{b}"), ".1f"),
                     ratio(s.get(f"decode_tok_s_b{b}"), a.get(f"decode_tok_s_b{b}"))]
    return [r["workload"], r["variant"], str(r["tokens"]), fmt(r.get("vision_s"), ".3f"),
            fmt(a["prefill_s"], ".3f"), fmt(s["prefill_s"], ".3f"), ratio(a["prefill_s"], s["prefill_s"]),
            fmt(a.get("ttft_s"), ".3f"), fmt(s.get("ttft_s"), ".3f"), ratio(a.get("ttft_s"), s.get("ttft_s")),
            *dec(1), *dec(batch), fmt(a["peak_mib"], ".0f"), fmt(s["peak_mib"], ".0f")]


def table_line(cells: list[str], batch: int) -> str:
    """Cells in columns as wide as the head's (at least 8), so that lines printed one at a time line up."""
    widths = [14, 8] + [max(8, len(h)) for h in table_head(batch)[2:]]
    return "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))


def table(rows: list[dict], batch: int) -> str:
    rule = ["-" * 14, "-" * 8] + ["-" * max(8, len(h)) for h in table_head(batch)[2:]]
    return "\n".join(table_line(cells, batch) for cells in [table_head(batch), rule]
                     + [table_cells(r, batch) for r in rows])


def columns(head: list[str], rows: list[list[str]], left: int) -> str:
    """A table indented by two spaces, each column as wide as its widest cell: the first `left` columns flush
    left (names), the others flush right (numbers)."""
    widths = [max(len(cells[i]) for cells in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "  ".join(c.ljust(w) if i < left else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    return "\n".join("  " + line(cells) for cells in [head, *rows])


def percent(rate: float | None, peak: float | None) -> str:
    return "-" if rate is None or peak is None else f"{100 * rate / peak:.1f}"


PREFILL_LIMITS_HEAD = ["workload", "variant", "tokens", "attn GFLOP", "LinMU GFLOP", "FLOP ratio", "speedup",
                       "attn TFLOP/s", "LinMU TFLOP/s", "attn % peak", "LinMU % peak"]


def prefill_limits(rows: list[dict], peak: dict) -> str:
    """Per workload and variant: each model's prefill work (prefill_flops), the FLOP rate it reached and its share of
    the peak, and the FLOP ratio (the speedup equal rates would give) next to the measured speedup."""
    gflop = lambda m: fmt(m["prefill_flops"] / 1e9 if "prefill_flops" in m else None, ".4g")
    cells = [[r["workload"], r["variant"], str(r["tokens"]), gflop(a), gflop(s),
              ratio(a.get("prefill_flops"), s.get("prefill_flops")), ratio(a["prefill_s"], s["prefill_s"]),
              fmt(a.get("prefill_tflop_s"), ".3g"), fmt(s.get("prefill_tflop_s"), ".3g"),
              percent(a.get("prefill_tflop_s"), peak["tflops"]), percent(s.get("prefill_tflop_s"), peak["tflops"])]
             for r in rows for a, s in [(r["attention"], r["linmu"])]]
    return columns(PREFILL_LIMITS_HEAD, cells, left=2)


DECODE_LIMITS_HEAD = ["workload", "variant", "batch", "attn tok/s", "LinMU tok/s", "speedup", "attn MB/step",
                      "LinMU MB/step", "byte ratio", "attn GB/s", "LinMU GB/s", "attn % peak", "LinMU % peak",
                      "attn cache MiB", "LinMU cache MiB"]


def decoding(m: dict, b: int) -> dict:
    """One model's decoding figures at batch b from its row, None where not measured, and its tokens/s as a cell."""
    tokens_per_s = m.get(f"decode_tok_s_b{b}")
    step = m["step_weight_bytes"] + b * m["step_sequence_bytes"] if "step_weight_bytes" in m else None
    return dict(tokens_per_s=tokens_per_s, step=step, gb_s=m.get(f"decode_gb_s_b{b}"),
                cache_mib=m.get(f"decode_cache_mib_b{b}"),
                cell="does not fit" if f"decode_tok_s_b{b}" in m and tokens_per_s is None else fmt(tokens_per_s, ".1f"))


def decode_limits(rows: list[dict], batches: list[int], peak: dict) -> str:
    """Per workload, variant and batch size: each model's tokens/s ("does not fit" where its caches do not), the
    bytes a step moves (step_bytes) and the rate reached, its share of the peak, the caches held, and the byte ratio
    (the speedup equal rates would give) next to the measured speedup."""
    cells = []
    for r in rows:
        for b in batches:
            a, s = (decoding(r[name], b) for name in MODELS)
            cells.append([r["workload"], r["variant"], str(b), a["cell"], s["cell"],
                          ratio(s["tokens_per_s"], a["tokens_per_s"]),
                          fmt(a["step"] and a["step"] / 1e6, ".4g"), fmt(s["step"] and s["step"] / 1e6, ".4g"),
                          ratio(a["step"], s["step"]), fmt(a["gb_s"], ".3g"), fmt(s["gb_s"], ".3g"),
                          percent(a["gb_s"], peak["gbs"]), percent(s["gb_s"], peak["gbs"]),
                          fmt(a["cache_mib"], ".4g"), fmt(s["cache_mib"], ".4g")])
    return columns(DECODE_LIMITS_HEAD, cells, left=2)


MIXER_HEAD = f"  {'tokens':>7s}  {'attention s':>11s}  {'M-MATE s':>8s}  speedup"


def mixer_line(r: dict) -> str:
    return (f"  {r['tokens']:7d}  {fmt(r['attention'], '.4f'):>11s}  {fmt(r['linmu'], '.4f'):>8s}  "
            f"{ratio(r['attention'], r['linmu']):>7s}")


def mixer_table(rows: list[dict]) -> str:
    """The mixer-alone sweep: seconds per length for both, the speedup, and both log-log slopes."""
    lines = [MIXER_HEAD] + [mixer_line(r) for r in rows]
    for name, label in zip(MODELS, ("attention", "M-MATE")):
        points = [r for r in rows if r[name] is not None]  # lengths that did not run out of memory
        if len(points) < 2:
            continue
        tokens, seconds = [r["tokens"] for r in points], [r[name] for r in points]
        pairs = " ".join(f"{loglog_slope(tokens[i:i + 2], seconds[i:i + 2]):.2f}" for i in range(len(points) - 1))
        lines.append(f"  {label:9s} slope over the longest {min(3, len(points))} lengths: "
                     f"{loglog_slope(tokens[-3:], seconds[-3:]):.2f} (successive: {pairs})")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> str:
    """TTFT (or prefill where TTFT was not measured) and decoding throughput against video length, as a PNG."""
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no plot (pip install matplotlib for one)"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    videos = [r for r in rows if r["workload"].startswith("video")]
    if not videos:
        return "no video workloads: no plot"
    figure, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    for variant in dict.fromkeys(r["variant"] for r in videos):
        points = sorted((r for r in videos if r["variant"] == variant and all(r[m]["prefill_s"] for m in MODELS)),
                        key=lambda r: r["frames"])
        seconds = [r["frames"] for r in points]
        key = "ttft_s" if all("ttft_s" in r["linmu"] for r in points) else "prefill_s"
        for name, label in zip(MODELS, ("attention", "LinMU")):
            what = "TTFT" if key == "ttft_s" else "prefill"
            left.plot(seconds, [r[name][key] for r in points], "o-", label=f"{label} {what} ({variant})")
            right.plot(seconds, [r[name]["decode_tok_s_b1"] for r in points], "o-", label=f"{label} ({variant})")
    left.set(xscale="log", yscale="log", xlabel="video length (s, 1 fps)", ylabel="seconds",
             title="time to first token")
    right.set(xscale="log", xlabel="video length (s, 1 fps)", ylabel="tokens / s", title="decoding, batch 1")
    for axes in (left, right):
        axes.grid(True, which="both", alpha=0.3)
        axes.legend()
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    return f"plot written to {path}"


def machine(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)}, CUDA {torch.version.cuda}"
    model = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M) \
        if Path("/proc/cpuinfo").is_file() else None
    name = model.group(1) if model else platform.processor() or platform.machine()
    return f"{name}, {torch.get_num_threads()} threads"


# ----------------------------------------------------------------------------------------------
# Command line


def int_list(text: str) -> list[int]:
    values = [int(v) for v in text.split(",") if v.strip()] if text.strip() else []
    if any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive integers separated by commas, got {text!r}")
    return values


def tiles_arg(text: str) -> tuple[int, int] | None:
    if text == "none":
        return None
    match = re.fullmatch(r"(\d+)x(\d+)", text)
    if not match or min(map(int, match.groups())) < 1:
        raise argparse.ArgumentTypeError(f"expected ROWSxCOLS such as 4x4, or none, got {text!r}")
    return int(match[1]), int(match[2])


def variants_arg(text: str) -> list[str]:
    values = [v.strip() for v in text.split(",")]
    if not values or any(v not in ("eager", "compile") for v in values):
        raise argparse.ArgumentTypeError(f"expected eager, compile or eager,compile, got {text!r}")
    return values


@user_errors("bench.py")
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench.py",
                                     description=__doc__.split("\n\n")[0] + " Defaults depend on the device "
                                     "(shown as cpu / cuda); see the module docstring for what is measured.",
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="teacher config.json (Hugging Face SmolVLM form) for random-weight models (default: "
                             "SmolVLM2-256M's, bundled)")
    parser.add_argument("--model", help="a LinMU student checkpoint directory (convert.py or distill.py output) to "
                                        "time instead of converting the random teacher; the teacher is then built "
                                        "from its config without 'linmu' (random weights) unless --teacher is given")
    parser.add_argument("--teacher", help="a teacher checkpoint directory or Hub id to load instead of random weights")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"],
                        help="weights and activations (default: bfloat16 on cuda, float32 on cpu)")
    parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                        help="CPU threads for torch (default: the cores this process may use, %(default)s)")
    parser.add_argument("--layers", type=int,
                        help="decoder layers to keep, 0 for all (default: cpu 2, cuda all); every layer costs the "
                             "same, so fewer layers scale both models' decoder times alike")
    parser.add_argument("--tiles", type=tiles_arg, default=(4, 4),
                        help="the high-resolution workload: ROWSxCOLS tiles plus the global image, or none "
                             "(default: 4x4, 17 images)")
    parser.add_argument("--frames", type=int_list,
                        help="video workloads: comma-separated frame counts at 1 fps (default: cpu "
                             f"{DEFAULTS['cpu']['frames']}; cuda {DEFAULTS['cuda']['frames']})")
    parser.add_argument("--lengths", type=int_list,
                        help="the pure sequence-length sweep: comma-separated text-only prompt lengths, empty for "
                             f"none (default: cpu {DEFAULTS['cpu']['lengths']}; cuda {DEFAULTS['cuda']['lengths']})")
    parser.add_argument("--mixer-lengths", type=int_list,
                        help="one layer's mixer alone (attention vs M-MATE) on videos of about these many visual "
                             f"tokens (whole frames), empty for none (default: cpu {DEFAULTS['cpu']['mixer_lengths']}; "
                             f"cuda {DEFAULTS['cuda']['mixer_lengths']})")
    parser.add_argument("--vision-frames", type=int,
                        help="measure end-to-end TTFT (vision encoder included) for workloads with at most this many "
                             f"frames (default: cpu {DEFAULTS['cpu']['vision_frames']}, "
                             f"cuda {DEFAULTS['cuda']['vision_frames']})")
    parser.add_argument("--new-tokens", type=int,
                        help="greedy decoding steps timed for throughput (default: cpu "
                             f"{DEFAULTS['cpu']['new_tokens']}, cuda {DEFAULTS['cuda']['new_tokens']})")
    parser.add_argument("--batch", type=int_list,
                        help="decoding batch sizes besides 1 (always measured), comma-separated, empty for none "
                             f"(default: cpu {DEFAULTS['cpu']['batch']}; cuda powers of two from 8 up to the most "
                             "sequences whose teacher cache at the longest workload fits --memory-budget-mib, and "
                             "that most)")
    parser.add_argument("--memory-budget-mib", type=float,
                        help="memory, in MiB, that a decoding batch's caches may take beside the batch-1 prefill's; a "
                             "batch over it is not run and reported as 'does not fit' (default: the memory free once "
                             "the models are built: CUDA's free memory, a CPU's MemAvailable)")
    parser.add_argument("--peak-tflops", type=float,
                        help="the device's peak dense TFLOP/s in --dtype, for the '%% of peak' columns (default: "
                             "configs/cards.json's figure for a known CUDA card in bfloat16, else unknown)")
    parser.add_argument("--peak-gbs", type=float,
                        help="the device's peak memory GB/s, for the '%% of peak' columns (default: "
                             "configs/cards.json's figure for a known CUDA card, else unknown)")
    parser.add_argument("--profile", metavar="WORKLOAD",
                        help="instead of timing, profile the first decoder layer of each model (eager) on this "
                             "workload, named as the table names it (e.g. 'video 64 s'; the workloads come from "
                             "--frames, --lengths and --tiles): its prefill and one decoding step, printing the top "
                             "operations by device time; with --json FOLDER, writes their Chrome traces there")
    parser.add_argument("--variants", type=variants_arg,
                        help="eager, compile (torch.compile'd layers) or eager,compile (default: cpu "
                             f"{DEFAULTS['cpu']['variants']}, cuda {DEFAULTS['cuda']['variants']})")
    parser.add_argument("--warmup", type=int, default=1,
                        help="untimed runs before each measurement (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="timed runs; the median is reported (default: %(default)s)")
    parser.add_argument("--json", help="also write the results, machine-readable, to this file; with --profile, a "
                                       "folder (created if need be) for the Chrome traces")
    parser.add_argument("--plot", default="bench.png",
                        help="PNG of TTFT and throughput against video length, when matplotlib is installed "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    device = check_device(args.device)
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, int_list(value) if name in ("frames", "lengths", "mixer_lengths", "batch") and value
                    else variants_arg(value) if name == "variants" else value)
    check_bounds(args, at_least={"threads": 1, "new_tokens": 1, "repeats": 1, "layers": 0, "vision_frames": 0,
                                 "warmup": 0}, above={"memory_budget_mib": 0, "peak_tflops": 0, "peak_gbs": 0})
    args.device = device
    return args


@user_errors("bench.py")
def profile_target(args, loads: list[Workload]) -> tuple[Workload, Path | None]:
    """The workload --profile names, and the folder --json names for the traces (created), or None."""
    load = next((w for w in loads if w.name == args.profile), None)
    if load is None:
        raise InputError(f"--profile {args.profile!r}: no such workload; these flags give "
                         + ", ".join(repr(w.name) for w in loads))
    folder = None if args.json is None else Path(args.json)
    if folder is not None:
        folder.mkdir(parents=True, exist_ok=True)
    return load, folder


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = args.device
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    teacher, student, source = build_models(args, device, dtype)
    models = dict(zip(MODELS, (teacher, student)))
    config, layers = teacher.config, len(decoder_layers(teacher))
    loads = workloads(config, args.tiles, args.frames, args.lengths)
    if args.profile is not None:
        load, folder = profile_target(args, loads)
        print(f"bench.py --profile: LinMU student vs attention teacher on {machine(device)}\n"
              f"torch {torch.__version__}, {device}, {str(dtype).removeprefix('torch.')}, {source}; LinMU's "
              f"{tuning_for(device)}", flush=True)
        for name, model in models.items():
            print("\n".join(profile_layer(model, name, load, device, folder)), flush=True)
        print(f"Chrome traces written to {folder}" if folder else "no Chrome traces: pass --json FOLDER for them")
        return []
    if args.memory_budget_mib is None:
        free = free_memory(device)
        args.memory_budget_mib = None if free is None else free / 2**20
    longest = max(loads, key=lambda w: w.tokens)
    teacher_cache = step_bytes(config, layers, longest.tokens + args.new_tokens, dtype).cache
    most = None if args.memory_budget_mib is None else most_sequences(teacher_cache, args.memory_budget_mib * 2**20)
    if args.batch is None:  # CUDA's default: up to the most sequences the teacher's cache fits at the longest workload
        args.batch = default_batches(most)
    largest = max(decode_batches(args))
    peak = peak_rates(args, device, dtype)

    header = [f"bench.py: LinMU student vs attention teacher on {machine(device)}",
              f"torch {torch.__version__}, {device}, {str(dtype).removeprefix('torch.')}, {source}; decoder "
              f"{layers} of {config.text.num_hidden_layers} layers, width {config.text.hidden_size}, "
              f"{config.text.num_attention_heads} heads; {config.image_seq_len} tokens per frame or tile; LinMU's "
              f"{tuning_for(device)}",
              f"median of {args.repeats} after {args.warmup} warm-up; decoding {args.new_tokens} tokens "
              f"({'CUDA graphs' if device.type == 'cuda' else 'eager'}); vision encoder timed for at most "
              f"{args.vision_frames} frames, TTFT = vision encoder + prefill",
              f"decoding batches {', '.join(map(str, decode_batches(args)))}; memory budget for a batch's caches "
              + ("unknown: every batch is run" if args.memory_budget_mib is None else
                 f"{args.memory_budget_mib:.6g} MiB, in which the teacher's caches at {longest.name} "
                 f"({teacher_cache / 2**20:.4g} MiB a sequence) fit {most} sequences beside the batch-1 prefill's"),
              peak["line"]]
    print("\n".join(header), flush=True)
    rows, mixers, slopes = [], [], []
    results = lambda: {"header": header, "machine": machine(device), "torch": torch.__version__, "device": str(device),
                       "dtype": str(dtype).removeprefix("torch."), "source": source, "decoder_layers": layers,
                       "settings": {k: v for k, v in vars(args).items() if k not in ("device",)},
                       "peak": {"tflops": peak["tflops"], "gbs": peak["gbs"]}, "results": rows, "scaling": slopes,
                       "mixers": mixers}
    runs = (len(args.variants) * len(loads) + len(args.mixer_lengths)) * len(MODELS)
    with tqdm(total=runs, desc="bench", unit="run") as bar:
        bar.write(table_line(table_head(largest), largest))
        for variant in args.variants:
            if variant == "compile":
                for model in models.values():
                    compile_model(model)
            for load in loads:
                row = dict(workload=load.name, variant=variant, tokens=load.tokens, frames=load.frames)
                if load.visual_tokens and load.frames <= args.vision_frames:
                    bar.set_postfix_str(f"{variant} {load.name}: vision encoder")
                    row["vision_s"] = bench_vision(teacher, load, args, device).seconds
                for name, model in models.items():
                    bar.set_postfix_str(f"{variant} {load.name} ({load.tokens} tokens) {name}")
                    try:
                        row[name] = bench_model(model, load, args, device)
                    except torch.OutOfMemoryError:  # the teacher's KV cache at long lengths, typically
                        row[name] = dict(prefill_s=None, peak_mib=None, cache_mib=None, warmup_extra_s=0.0,
                                         out_of_memory=True)
                        torch.cuda.empty_cache()
                        bar.write(f"{variant} {load.name}: {name} ran out of memory (reported as '-')")
                    if "vision_s" in row and row[name]["prefill_s"] is not None:
                        row[name]["ttft_s"] = row["vision_s"] + row[name]["prefill_s"]
                    bar.update()
                rows.append(row)
                bar.write(table_line(table_cells(row, largest), largest))
                if args.json:
                    write_json(args.json, results())
        if args.mixer_lengths:
            bar.write("one decoder layer's mixer alone, eager, video tokens:\n" + MIXER_HEAD)
        for row in bench_mixers(teacher, student, args.mixer_lengths, args, device, bar):
            mixers.append(row)
            bar.write(mixer_line(row))
            if args.json:
                write_json(args.json, results())

    print("\n" + "\n".join(header))
    print(table(rows, largest))
    print("prefill against its limit: the matmul FLOPs counted from the sizes and the layout (as FlopCounterMode "
          "counts them), the rate reached; FLOP ratio = attention's FLOPs / LinMU's, the speedup equal rates would "
          f"give; {peak['line']}")
    print(prefill_limits(rows, peak))
    print("decoding against its limit: tokens/s; the bytes a step moves (the weights once, each sequence's caches "
          "read and what changes written) and the rate reached; byte ratio = attention's / LinMU's; the caches held; "
          + peak["line"])
    print(decode_limits(rows, decode_batches(args), peak))
    compiled = [r for r in rows if r["variant"] == "compile"]
    if compiled:
        print("compile time (warm-up less timed runs, s): " + ", ".join(
            f"{r['workload']}: attn {r['attention']['warmup_extra_s']:.1f} / LinMU {r['linmu']['warmup_extra_s']:.1f}"
            for r in compiled))
    print("decoding cache at batch 1 (MiB): " + ", ".join(
        f"{r['workload']}: attn {fmt(r['attention']['cache_mib'], '.3g')} / LinMU {fmt(r['linmu']['cache_mib'], '.3g')}"
        for r in rows if r["variant"] == args.variants[0]))
    print("scaling of the decoder prefill with prompt length (log-log slope: 1 linear, 2 quadratic):")
    slopes += [line for variant in args.variants
               for line in [f" {variant}:"] + scaling([r for r in rows if r["variant"] == variant])]
    print("\n".join(slopes))
    if mixers:
        print("one decoder layer's mixer alone, eager, video tokens (the part LinMU replaces; no MLP):")
        print(mixer_table(mixers))
    print(plot(rows, args.plot))
    if args.json:
        write_json(args.json, results())
        print(f"results written to {args.json}")
    return rows


if __name__ == "__main__":
    main()
