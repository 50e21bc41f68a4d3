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
    batch 1 and at --batch (the batch-1 prefill's caches repeated, as identical prompts give),
    through speed.decoder: fixed-size caches written in place, replayed as a CUDA graph on CUDA
    for both models (the first step, which records the graph, is not timed);
  * peak memory of the prefill: on CUDA torch.cuda.max_memory_allocated above what was allocated
    before; on CPU the growth of the process's peak resident set (VmHWM, reset through
    /proc/self/clear_refs) above its resident set before.

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
from linmu import PromptPlan, TokenLayout
from smolvlm import VLM, VLMConfig, check_checkpoint, convert_to_linmu, load_model, resolve_checkpoint
from speed import compile_model, decoder, tune, tuning_for

DEFAULT_CONFIG = Path(__file__).parent / "configs" / "smolvlm2-256m.json"
PREFIX_TOKENS, QUESTION_TOKENS = 16, 8  # chat template and system text before, the question after
FRAME_MARKER_TOKENS, TILE_MARKER_TOKENS = 10, 2  # "\nFrame from MM:SS:<fake><global-img>", "<fake><row_i_col_j>"
MODELS = ("attention", "linmu")

# Per-device defaults: a CPU runs 2 decoder layers (every layer costs the same, so the per-layer
# ratio is the model's), past the crossover and still short; a GPU runs the
# whole model from one image to videos of 17 minutes (1024 frames, about 75k tokens).
DEFAULTS = {
    "cpu": dict(frames="16,64,128,256", lengths="4096,16384", mixer_lengths="4096,8192,16384,32768", layers=2,
                vision_frames=1, new_tokens=16, batch=8, variants="eager"),
    "cuda": dict(frames="16,64,256,512,1024", lengths="8192,32768,65536", mixer_lengths="16384,65536,131072",
                 layers=0, vision_frames=1024, new_tokens=32, batch=8, variants="eager,compile"),
}


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


def workloads(config: VLMConfig, tiles: tuple[int, int] | None, frames: list[int], lengths: list[int]) -> list[Workload]:
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
            self.bytes = max(0, resident_kib("VmHWM") - self.before) * 1024  # a page read after the reset can make it -4 KiB


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
    features = (torch.randn(images, config.image_seq_len, config.text.hidden_size, generator=generator).to(device, dtype)
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


def bench_model(model: VLM, load: Workload, args, device: torch.device) -> dict:
    """The decoder measurements of one model on one workload: prefill, then decoding at batch 1 and args.batch."""
    ids, grids, features = workload_inputs(load, model.config, device, model.lm_head.weight.dtype)
    image_token_id = model.config.image_token_id
    run = measure(lambda: prefill(model, ids, grids, features, args.new_tokens), device, args.warmup, args.repeats)
    token, caches = run.result
    row = dict(prefill_s=run.seconds, peak_mib=None if run.peak_bytes is None else run.peak_bytes / 2**20,
               cache_mib=cache_bytes(caches) / 2**20, warmup_extra_s=run.warmup_extra)
    for batch in (1, args.batch):
        step = decoder(model, repeat_batch(caches, batch) if batch > 1 else caches)  # `batch` identical prompts
        first = token.repeat(batch)
        started = time.perf_counter()
        step(first, torch.full_like(first, ids.shape[1]))  # on CUDA: records the CUDA graph
        synchronize(device)
        row["warmup_extra_s"] += time.perf_counter() - started
        run = measure(lambda: decode(step, first, ids.shape[1], args.new_tokens, image_token_id), device,
                      args.warmup, args.repeats)
        row[f"decode_tok_s_b{batch}"] = batch * args.new_tokens / run.seconds
        row["warmup_extra_s"] += run.warmup_extra
        del step  # its graph holds the batch's caches
    return row


@torch.no_grad()
def bench_mixers(teacher: VLM, student: VLM, lengths: list[int], args, device: torch.device, bar: tqdm):
    """Layer 0's mixer of each model alone on the visual tokens of a video (whole frames, no text),
    the layout and PromptPlan built inside the timed call (the model's prefill builds them too): yields a row per length."""
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
        points = sorted((r for r in rows if pick(r) and all(r[m]["prefill_s"] for m in MODELS)), key=lambda r: r["tokens"])
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
        lines.append(f"  {series:9s} crossover: " + ("LinMU's prefill is not faster at any measured length" if wins is None
                     else f"LinMU's prefill is faster from {tokens[wins]} tokens on"
                     + (f" (attention faster at {tokens[wins - 1]})" if wins else " (every measured length)")))
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
    return f"{model.group(1) if model else platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"


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
    parser = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0] + " Defaults depend on the device "
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
    parser.add_argument("--batch", type=int,
                        help=f"the larger decoding batch (default: cpu {DEFAULTS['cpu']['batch']}, "
                             f"cuda {DEFAULTS['cuda']['batch']})")
    parser.add_argument("--variants", type=variants_arg,
                        help="eager, compile (torch.compile'd layers) or eager,compile (default: cpu "
                             f"{DEFAULTS['cpu']['variants']}, cuda {DEFAULTS['cuda']['variants']})")
    parser.add_argument("--warmup", type=int, default=1, help="untimed runs before each measurement (default: %(default)s)")
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the median is reported (default: %(default)s)")
    parser.add_argument("--json", help="also write the results, machine-readable, to this file")
    parser.add_argument("--plot", default="bench.png",
                        help="PNG of TTFT and throughput against video length, when matplotlib is installed "
                             "(default: %(default)s)")
    args = parser.parse_args(argv)
    device = check_device(args.device)
    defaults = DEFAULTS["cuda" if device.type == "cuda" else "cpu"]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, int_list(value) if name in ("frames", "lengths", "mixer_lengths") else
                    variants_arg(value) if name == "variants" else value)
    check_bounds(args, at_least={"threads": 1, "new_tokens": 1, "batch": 1, "repeats": 1,
                                 "layers": 0, "vision_frames": 0, "warmup": 0})
    args.device = device
    return args


def main(argv: list[str] | None = None) -> list[dict]:
    args = parse_args(argv)
    device = args.device
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype or ("bfloat16" if device.type == "cuda" else "float32"))
    teacher, student, source = build_models(args, device, dtype)
    models = dict(zip(MODELS, (teacher, student)))
    config, layers = teacher.config, len(decoder_layers(teacher))
    loads = workloads(config, args.tiles, args.frames, args.lengths)

    header = [f"bench.py: LinMU student vs attention teacher on {machine(device)}",
              f"torch {torch.__version__}, {device}, {str(dtype).removeprefix('torch.')}, {source}; decoder "
              f"{layers} of {config.text.num_hidden_layers} layers, width {config.text.hidden_size}, "
              f"{config.text.num_attention_heads} heads; {config.image_seq_len} tokens per frame or tile; LinMU's "
              f"{tuning_for(device)}",
              f"median of {args.repeats} after {args.warmup} warm-up; decoding {args.new_tokens} tokens "
              f"({'CUDA graphs' if device.type == 'cuda' else 'eager'}); vision encoder timed for at most "
              f"{args.vision_frames} frames, TTFT = vision encoder + prefill"]
    print("\n".join(header), flush=True)
    rows, mixers, slopes = [], [], []
    results = lambda: {"header": header, "machine": machine(device), "torch": torch.__version__, "device": str(device),
                       "dtype": str(dtype).removeprefix("torch."), "source": source, "decoder_layers": layers,
                       "settings": {k: v for k, v in vars(args).items() if k not in ("device",)},
                       "results": rows, "scaling": slopes, "mixers": mixers}
    runs = (len(args.variants) * len(loads) + len(args.mixer_lengths)) * len(MODELS)
    with tqdm(total=runs, desc="bench", unit="run") as bar:
        bar.write(table_line(table_head(args.batch), args.batch))
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
                bar.write(table_line(table_cells(row, args.batch), args.batch))
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
    print(table(rows, args.batch))
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
