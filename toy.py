"""LinMU on a laptop: a toy teacher, the three distillation stages and the paper's ablations, on CPU.

    python toy.py                       # the whole experiment (RESULTS.md gives its time), a table at the end
    python toy.py --seeds 3 --out toy.json  # three seeds: each row's mean and spread, and the results as JSON
    python toy.py --experiment local    # two shapes at once: a move is told by its neighbourhood alone
    python toy.py --experiment sweep    # the distillation settings the defaults were chosen from, "stream" among them
    python toy.py --experiment long     # every row, stage 2 four times as long: the README's table
    python toy.py --table a.json b.json # one table of seeds run apart, from their --out files
    python toy.py --quick               # a shortened run (what test_linmu.py checks)

The paper's claim is about quality: the LinMU student matches its attention teacher, each
distillation stage matters and both M-MATE branches are needed. Real checkpoints are not
everywhere, so this script shows the claim end to end on a task it builds itself:

The task, "where did it go?". A video of `frames` procedurally drawn 32x32 frames: one shape
(square, disc or cross, a different colour in every frame) walks one cell up, down, left or right
per frame on a 4x4 grid. The decoder sees each frame as a frame-marker token and 4x4 image tokens
(one token per cell), then `questions` questions, each "ask <colour>" answered by three tokens:
the row and the column of the shape in the frame where it had that colour, and the way it moved
to get there from the frame before. A model is scored on the last question, by exact match of its
greedily generated answer (generate.generate). Answering needs
  * global retrieval: the frame with that colour lies 12 to 63 tokens back, always outside the
    text window of Local-Swin (MixerConfig.text_window = 8), and
  * local structure: the exact cell of the shape, and its move, which compares neighbouring cells
    of two adjacent frames (the vision encoder sees one frame at a time, so only the decoder can).

The experiment. A tiny attention teacher in the real architecture (smolvlm.VLM: SigLIP encoder,
pixel-shuffle connector, Llama decoder) is trained from scratch on the task; convert.py's code path
(smolvlm.convert_to_linmu) turns it into a LinMU student, distill.py's train_stage runs the three
stages on fresh task samples (answers included), and the ablations run beside it: no stage 1,
no Local-Swin (Flex-MA only), no Flex-MA (Local-Swin only), no distillation and the prompt's own
scan order (no Rotary Major-Scan); the other hidden-state target ("stream") is a distillation
setting, one row of the sweep. Seeds are fixed: the same command prints the same table with the
same number of threads (others round differently).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import time
import statistics
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from distill import DistillConfig, evaluate, train_stage
from cli import write_json
from generate import generate
from linmu import MixerConfig
from smolvlm import VLM, TextConfig, VisionConfig, VLMConfig, convert_to_linmu
from speed import TUNING, tune

# ----------------------------------------------------------------------------------------------
# The task: procedurally drawn videos of a walking shape, and questions about them

COLOURS = {"red": (1.0, 0.15, 0.1), "green": (0.1, 0.85, 0.2), "blue": (0.2, 0.35, 1.0), "yellow": (1.0, 0.9, 0.1),
           "magenta": (0.9, 0.2, 0.9), "cyan": (0.1, 0.9, 0.9), "orange": (1.0, 0.55, 0.0), "white": (0.95, 0.95, 0.95)}
MOVES = {"up": (-1, 0), "down": (1, 0), "left": (0, -1), "right": (0, 1)}
ANSWER_LENGTH = 3  # row, column, move
SPLITS = {"teacher": 0, "distill": 1, "held_out": 2}  # disjoint sample streams of one generator


@dataclass
class Task:
    """The task's sizes: frames per video, questions per video, grid cells per side, pixels per cell,
    and shapes walking at once (each frame has `walkers` shapes, every one of them a colour of its own)."""

    frames: int = 4
    questions: int = 3
    grid: int = 4
    cell: int = 8
    walkers: int = 1

    @property
    def vocabulary(self) -> list[str]:
        """Every token of the task, in id order; "<image>" is the placeholder the vision features replace."""
        return (["<bos>", "<image>", "ask"] + [f"frame{t}" for t in range(self.frames)] + list(COLOURS)
                + [f"row{r}" for r in range(self.grid)] + [f"col{c}" for c in range(self.grid)] + list(MOVES))

    def token(self, name: str) -> int:
        return self.vocabulary.index(name)

    @property
    def length(self) -> int:
        """Tokens per sample: <bos>, per frame a marker and grid^2 image tokens, per question 2 + ANSWER_LENGTH."""
        return 1 + self.frames * (1 + self.grid**2) + self.questions * (2 + ANSWER_LENGTH)

    def answer_positions(self) -> torch.Tensor:
        """Positions of every answer token in a sample, question by question: (questions * ANSWER_LENGTH,)."""
        first = 1 + self.frames * (1 + self.grid**2) + 2  # after the first "ask <colour>"
        return torch.tensor([first + q * (2 + ANSWER_LENGTH) + i
                             for q in range(self.questions) for i in range(ANSWER_LENGTH)])


def shape_masks(cell: int) -> torch.Tensor:
    """The drawable shapes, each inside a one-pixel margin of its cell: square, disc, cross -> (3, cell, cell)."""
    y, x = torch.meshgrid(torch.arange(cell) + 0.5, torch.arange(cell) + 0.5, indexing="ij")
    d = (y - cell / 2).abs(), (x - cell / 2).abs()
    square = (d[0] < cell / 2 - 1) & (d[1] < cell / 2 - 1)
    disc = d[0] ** 2 + d[1] ** 2 < (cell / 2 - 0.8) ** 2
    cross = ((d[0] < 1) | (d[1] < 1)) & square
    return torch.stack([square, disc, cross]).float()


def sample_seed(seed: int, split: str, index: int) -> int:
    """The generator seed of batch `index` of a split: every batch is reproducible on its own."""
    return (seed * len(SPLITS) + SPLITS[split]) * 1_000_003 + index


def walks(count: int, frames: int, grid: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """`count` random walks on the grid: a random start, then at each frame a random move that stays
    on the grid -> cells (count, frames, 2): row, col, and moves (count, frames): the move into
    frame t, an index of MOVES (frame 0 has none: 0)."""
    steps = torch.tensor(list(MOVES.values()))  # (4, 2)
    cells = torch.zeros(count, frames, 2, dtype=torch.long)
    moves = torch.zeros(count, frames, dtype=torch.long)
    cells[:, 0] = torch.randint(0, grid, (count, 2), generator=g)
    for t in range(1, frames):
        target = cells[:, t - 1, None] + steps  # (count, 4, 2)
        allowed = ((target >= 0) & (target < grid)).all(-1).float()  # (count, 4)
        moves[:, t] = torch.multinomial(allowed, 1, generator=g).squeeze(1)
        cells[:, t] = cells[:, t - 1] + steps[moves[:, t]]
    return cells, moves


def untangled(cells: torch.Tensor) -> torch.Tensor:
    """Whether each sample's walkers can be told apart by where they are: (B, W, T, 2) -> (B,) bool.
    In every frame the shapes stand in different cells, and the only shape of frame t - 1 on or
    next to a shape's cell in frame t is that shape itself, so the move that brought a shape to its
    cell is defined by its neighbourhood alone (shapes and colours change every frame)."""
    now, before = cells[:, :, None, 1:], cells[:, None, :, :-1]  # (B, W, 1, T-1, 2), (B, 1, W, T-1, 2)
    apart = (cells[:, :, None] != cells[:, None]).any(-1).all(-1)  # (B, W, W): w and v never share a cell
    far = ((now - before).abs().sum(-1) > 1).all(-1)  # (B, W, W): w at t never on or next to v at t-1
    itself = torch.eye(cells.shape[1], dtype=torch.bool)  # (W, W): w == v, a shape and its own walk
    return (apart & far | itself).flatten(1).all(1)


def make_batch(task: Task, size: int, seed: int) -> dict:
    """`size` samples drawn from torch.Generator(seed), as the batch dict distill.train_stage reads.

    input_ids (B, L) hold whole samples, answers included; attention_mask (B, L) is all ones (no
    padding: every sample has task.length tokens); pixel_values (B * frames, 3, H, W); grids: one
    (frames, grid, grid) video per sample; answer (B, 3): the last question's answer tokens.
    """
    g = torch.Generator().manual_seed(seed)
    T, G, n, W = task.frames, task.grid, task.cell, task.walkers
    cells, moves = walks(size * W, T, G, g)  # (B*W, T, 2), (B*W, T)
    cells, moves = cells.view(size, W, T, 2), moves.view(size, W, T)
    while (tangled := ~untangled(cells)).any():  # draw again the walks whose shapes could be confused
        again = walks(int(tangled.sum()) * W, T, G, g)
        cells[tangled], moves[tangled] = again[0].view(-1, W, T, 2), again[1].view(-1, W, T)
    colours = torch.stack([torch.randperm(len(COLOURS), generator=g)[:W * T] for _ in range(size)]).view(size, W, T)
    shapes = torch.randint(0, 3, (size, W, T), generator=g)

    # draw: dark noisy background, each shape's mask placed in its cell, painted in its colour
    where = F.one_hot(cells[..., 0] * G + cells[..., 1], G * G).float().view(size, W, T, G, 1, G, 1)
    mask = (where * shape_masks(n)[shapes].view(size, W, T, 1, n, 1, n)).view(size, W, T, 1, G * n, G * n)
    paint = torch.tensor(list(COLOURS.values()))[colours].view(size, W, T, 3, 1, 1)
    background = 0.05 + 0.1 * torch.rand(size, T, 3, G * n, G * n, generator=g)
    pixels = background * (1 - mask.sum(1)) + (paint * mask).sum(1)  # (B, T, 3, H, W): the shapes never overlap

    # the tokens: the video, then questions about distinct shapes in frames 1.. T-1 (each has a move)
    asked = torch.stack([torch.randperm((T - 1) * W, generator=g)[:task.questions] for _ in range(size)])  # (B, Q)
    walker, frame = asked // (T - 1), asked % (T - 1) + 1  # (B, Q) each
    marked = lambda t: [task.token(f"frame{t}")] + [task.token("<image>")] * G * G  # frame t: its marker, its cells
    video = [task.token("<bos>")] + sum((marked(t) for t in range(T)), [])
    colour_ids = torch.tensor([task.token(c) for c in COLOURS])
    b = torch.arange(size)[:, None]
    qa = torch.stack([torch.full_like(asked, task.token("ask")), colour_ids[colours[b, walker, frame]],
                      cells[b, walker, frame, 0] + task.token("row0"), cells[b, walker, frame, 1] + task.token("col0"),
                      moves[b, walker, frame] + task.token(next(iter(MOVES)))], dim=-1)  # (B, Q, 5)
    input_ids = torch.cat([torch.tensor(video).expand(size, -1), qa.flatten(1)], dim=1)  # (B, L)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "pixel_values": pixels.flatten(0, 1),
            "pixel_attention_mask": None, "grids": [[(T, G, G)] for _ in range(size)],
            "answer": input_ids[:, -ANSWER_LENGTH:]}


# ----------------------------------------------------------------------------------------------
# The models: a tiny SmolVLM-shaped teacher and its LinMU student


def toy_config(task: Task) -> VLMConfig:
    """A tiny SmolVLM2: 32x32 frames, 4x4 patches, pixel shuffle 2 -> one decoder token per grid cell."""
    patch = task.cell // 2
    vision = VisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                          image_size=task.grid * task.cell, patch_size=patch)
    text = TextConfig(vocab_size=len(task.vocabulary), hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    return VLMConfig(vision=vision, text=text, scale_factor=2, image_token_id=task.token("<image>"))


def toy_mixer(task: Task) -> MixerConfig:
    """M-MATE sized for the toy: Swin windows of two whole frames, a text window of 8 tokens (one
    question and a half: the frames are out of its reach)."""
    return MixerConfig(window_frames=2, window_rows=task.grid, window_cols=task.grid, text_window=8)


def train_teacher(teacher: VLM, task: Task, steps: int, batch_size: int, lr: float, seed: int) -> None:
    """Train from scratch: cross-entropy on every answer token, AdamW, warm-up then cosine decay."""
    optimizer = torch.optim.AdamW(teacher.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * s / steps))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    targets = task.answer_positions()
    teacher.train()
    for step in (bar := tqdm(range(steps), desc="teacher")):
        batch = make_batch(task, batch_size, sample_seed(seed, "teacher", step))
        logits = teacher(batch["input_ids"], batch["pixel_values"], grids=batch["grids"]).logits  # (B, L, V)
        loss = F.cross_entropy(logits[:, targets - 1].flatten(0, 1), batch["input_ids"][:, targets].flatten())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(teacher.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        bar.set_postfix(loss=f"{loss.item():.3f}")
    teacher.eval()


# ----------------------------------------------------------------------------------------------
# Measuring: exact match on held-out videos, and agreement with the teacher


@torch.no_grad()
def answers(model: VLM, batch: dict) -> torch.Tensor:
    """Greedy answers to the last question, prefill then cached steps: (B, ANSWER_LENGTH) token ids."""
    prompt = batch["input_ids"][:, :-ANSWER_LENGTH]
    return generate(model, prompt, batch["pixel_values"], grids=batch["grids"], max_new_tokens=ANSWER_LENGTH)


def measure(model: VLM, held_out: list[dict], teacher: VLM | None = None,
            teacher_answers: list[torch.Tensor] | None = None) -> dict[str, float]:
    """Exact-match accuracy on the held-out batches; for a student also the share of answers equal
    to the teacher's and distill.evaluate's per-token KL and top-1 agreement with the teacher."""
    model.eval()
    given = [answers(model, batch) for batch in held_out]
    correct = sum(int((a == batch["answer"]).all(1).sum()) for a, batch in zip(given, held_out))
    total = sum(len(batch["answer"]) for batch in held_out)
    result = {"accuracy": correct / total}
    if teacher is not None:
        result["agreement"] = sum(int((a == t).all(1).sum()) for a, t in zip(given, teacher_answers)) / total
        result.update({k: v for k, v in evaluate(model, teacher, held_out).items() if k in ("kl", "top1")})
    return result


# ----------------------------------------------------------------------------------------------
# The experiment


@dataclass
class Settings:
    """How long everything trains: the teacher, then each distillation stage (steps, peak lr, samples
    per step; the losses are DistillConfig's defaults); held-out samples = eval_batches x 128."""

    teacher_steps: int
    teacher_batch: int
    teacher_lr: float
    stage_steps: tuple[int, int, int]
    stage_lr: tuple[float, float, float]
    batch_size: int
    eval_batches: int


FULL = Settings(teacher_steps=1500, teacher_batch=32, teacher_lr=5e-3, stage_steps=(600, 600, 150),
                stage_lr=(1.5e-2, 1e-2, 3e-3), batch_size=8, eval_batches=4)
QUICK = Settings(teacher_steps=150, teacher_batch=16, teacher_lr=5e-3, stage_steps=(20, 20, 10),
                 stage_lr=(1.5e-2, 1e-2, 3e-3), batch_size=8, eval_batches=1)

# The rows after the teacher: (name, the stages run with their overrides). A row starting with the
# stages of an earlier row continues from that row's student (no stage is trained twice). Stage 0
# is the conversion itself, with MixerConfig overrides (the default conversion when absent).
RECIPES = [
    ("no distillation (converted init)", []),
    ("stage 1 (Flex-MA)", [(1, {})]),
    ("stages 1-2", [(1, {}), (2, {})]),
    ("LinMU: stages 1-3", [(1, {}), (2, {}), (3, {})]),
    ("ablation: no stage 1", [(2, {}), (3, {})]),
    ("ablation: Flex-MA only", [(1, {}), (2, {"branches": "flex"}), (3, {"branches": "flex"})]),
    ("ablation: Local-Swin only", [(2, {"branches": "swin"}), (3, {"branches": "swin"})]),
    ("ablation: no Rotary Major-Scan", [(0, {"rotary_scan": False}), (1, {}), (2, {}), (3, {})]),
]

# The local experiment: two shapes walk at once (Task.walkers = 2), and a shape's shape and colour
# change every frame, so the only way to tell which shape of the frame before a shape came from is
# where it stood: the one shape on or next to its cell (make_batch draws no other). The move is a
# comparison of neighbouring cells of two adjacent frames: a Swin window holds them all, while
# Flex-MA's convolution reaches some of them in some scan orders only. The rows: the full recipe
# and Flex-MA alone, each with and without Rotary Major-Scan. Two walkers take the teacher twice
# the steps to learn (on seed 0: 0.58 exact match after 1,500 steps, 0.91 after 3,000).
LOCAL_RECIPES = [r for r in RECIPES
                 if r[0] in ("LinMU: stages 1-3", "ablation: Flex-MA only", "ablation: no Rotary Major-Scan")] + [
    ("ablation: Flex-MA only, no Rotary Major-Scan",
     [(0, {"rotary_scan": False}), (1, {}), (2, {"branches": "flex"}), (3, {"branches": "flex"})])]
LOCAL = replace(FULL, teacher_steps=3000)

# The sweep: the full recipe (stages 1-3) under other distillation and initialization settings:
# the logit-KL temperature T and weight w (the same in every stage), then Flex-MA's initial dt/A
# spread (MixerConfig.dt_max, A_max; Mamba2's is dt <= 0.1, A <= 16) at T = 2, w = 3, then the
# other hidden-state target, "stream" (the student's own residual stream, at the default T and
# w). The defaults (DistillConfig: T = 4, w = 3, "layer"; MixerConfig: Mamba2's spread) come from
# this table.
SWEEP = [(f"T = {T:g}, w = {w:g}", [(stage, {"temperature": T, "kl_weight": w}) for stage in (1, 2, 3)])
         for T, w in [(1, 1), (2, 1), (2, 3), (4, 3), (2, 10)]]
SWEEP += [(f"T = 2, w = 3, dt <= {dt:g}, A <= {A:g}", [(0, {"dt_max": dt, "A_max": A})]
           + [(stage, {"temperature": 2, "kl_weight": 3}) for stage in (1, 2, 3)]) for dt, A in [(1e-2, 1), (1e-1, 1)]]
SWEEP += [("hidden target \"stream\"", [(stage, {"hidden_target": "stream"}) for stage in (1, 2, 3)])]

# The long experiment: the default run with stage 2 four times as long (2,400 steps), for the full
# recipe and every ablation. The default run stops stage 2 at 600 steps, to stay short, where the
# student is still learning; this shows where each recipe goes given the steps.
LONG = replace(FULL, stage_steps=(600, 2400, 150))

# name: the task, its rows, how long they train
EXPERIMENTS = {"recipes": (Task(), RECIPES, FULL), "local": (Task(walkers=2), LOCAL_RECIPES, LOCAL),
               "sweep": (Task(), SWEEP, FULL), "long": (Task(), RECIPES, LONG)}


def run(settings: Settings, seed: int, recipes: list = RECIPES, task: Task = Task()) -> dict:
    """Train the teacher, convert it, distill each recipe -> {"rows": [teacher, then one per recipe], ...}."""
    started = time.perf_counter()
    torch.manual_seed(seed)
    teacher = tune(VLM(toy_config(task)), TUNING["cpu"])  # toy.py runs on the CPU
    train_teacher(teacher, task, settings.teacher_steps, settings.teacher_batch, settings.teacher_lr, seed)
    teacher.requires_grad_(False)
    held_out = [make_batch(task, 128, sample_seed(seed, "held_out", i))
                for i in range(settings.eval_batches)]
    teacher_answers = [answers(teacher, batch) for batch in held_out]
    base = measure(teacher, held_out)
    rows = [{"model": "attention teacher", "stages": "-", **base, "agreement": 1.0, "kl": 0.0, "top1": 1.0}]
    tqdm.write(f"teacher: held-out exact match {base['accuracy']:.3f} "
               f"(chance about {1 / (task.grid ** 2 * len(MOVES)):.3f})")

    init = tune(convert_to_linmu(teacher, toy_mixer(task)), TUNING["cpu"])
    students = {(): init}  # the student after each prefix of stages, by the prefix
    for name, recipe in recipes:
        key = tuple((stage, tuple(sorted(o.items()))) for stage, o in recipe)
        done = max((k for k in students if k == key[:len(k)]), key=len)
        student = copy.deepcopy(students[done])
        for i in range(len(done), len(key)):
            stage, overrides = recipe[i]
            if stage == 0:
                student = tune(convert_to_linmu(teacher, replace(toy_mixer(task), **overrides)), TUNING["cpu"])
                students[key[:i + 1]] = copy.deepcopy(student)
                continue
            torch.manual_seed(seed + stage)
            cfg = DistillConfig(**{"stage": stage, "steps": settings.stage_steps[stage - 1],
                                   "lr": settings.stage_lr[stage - 1], "batch_size": settings.batch_size,
                                   "warmup": settings.stage_steps[stage - 1] // 20,
                                   "eval_every": 0, "save_every": 0, "seed": seed, **overrides})
            batch_at = lambda j, s=stage: make_batch(task, settings.batch_size,
                                                     sample_seed(seed, "distill", 10_000 * s + j))
            train_stage(student, teacher, batch_at, [], cfg)
            students[key[:i + 1]] = copy.deepcopy(student)
        row = {"model": name, "stages": " + ".join(str(s) for s, _ in recipe if s) or "-",
               **measure(student, held_out, teacher, teacher_answers)}
        row["of_teacher"] = row["accuracy"] / base["accuracy"] if base["accuracy"] else math.nan
        rows.append(row)
        tqdm.write(f"{name}: exact match {row['accuracy']:.3f} ({row['of_teacher']:.0%} of the teacher), "
                   f"answers equal to the teacher's {row['agreement']:.3f}")
    rows[0]["of_teacher"] = 1.0
    return {"rows": rows, "settings": asdict(settings), "task": asdict(task), "seed": seed,
            "held_out_samples": sum(len(b["answer"]) for b in held_out), "seconds": time.perf_counter() - started}


METRICS = ("accuracy", "of_teacher", "agreement", "kl", "top1")


def summarize(results: list[dict]) -> list[dict]:
    """One row per model over the seeds' runs: each metric's mean, and its standard deviation
    across seeds (0 for a single seed). A seed whose teacher answered nothing right has no "% of
    teacher" (NaN): that metric is taken over the other seeds, NaN if none has it."""
    rows = []
    for same in zip(*(result["rows"] for result in results)):
        row = {"model": same[0]["model"], "stages": same[0]["stages"]}
        for metric in METRICS:
            values = [r[metric] for r in same if not math.isnan(r[metric])]
            row[metric] = statistics.fmean(values) if values else math.nan
            row[f"{metric}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
        rows.append(row)
    return rows


def table(rows: list[dict], seeds: int) -> str:
    """The summary as a markdown table: the mean over the seeds, and its spread where there are several."""
    cell = lambda r, metric, spec: (format(r[metric], spec) if seeds == 1
                                    else f"{format(r[metric], spec)} ± {format(r[f'{metric}_std'], spec)}")
    lines = ["| model | stages | held-out exact match | % of teacher | answers = teacher's | token KL to teacher "
             "| token top-1 agreement |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['stages']} | {cell(r, 'accuracy', '.3f')} | "
                     f"{cell(r, 'of_teacher', '.0%')} | "
                     f"{cell(r, 'agreement', '.3f')} | {cell(r, 'kl', '.4f')} | {cell(r, 'top1', '.3f')} |")
    return "\n".join(lines)


def report(results: list[dict]) -> str:
    """What a run prints at the end: the table over its seeds, then the held-out size and each seed's minutes."""
    seeds = ", ".join(str(r["seed"]) for r in results)
    minutes = ", ".join(f"{r['seconds'] / 60:.1f}" for r in results)
    return (f"{table(summarize(results), len(results))}\n\n{results[0]['held_out_samples']} held-out videos, "
            f"seed{'s' if len(results) > 1 else ''} {seeds}: {minutes} minutes")


def load_runs(paths: list[str]) -> list[dict]:
    """The runs held in --out files, by seed: all of one experiment (the same task, settings and
    rows) and each seed once, as one --seeds run would have them. ValueError naming the problem."""
    runs = []
    for path in paths:
        try:
            found = json.loads(Path(path).read_text())["runs"]
            keys = {"seed", "task", "settings", "rows", "seconds", "held_out_samples"}
            if not all(keys <= run.keys() for run in found):
                raise ValueError("a run lacks a field")
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(f"{path} is not a file toy.py --out wrote ({error})") from None
        runs += found
    if len({json.dumps([r["task"], r["settings"], [row["model"] for row in r["rows"]]]) for r in runs}) > 1:
        raise ValueError("the files hold runs of different experiments or settings: give the runs of one experiment")
    seeds = sorted(r["seed"] for r in runs)
    if len(set(seeds)) < len(seeds):
        raise ValueError(f"the files hold seeds {seeds}: give each seed's run once")
    return sorted(runs, key=lambda r: r["seed"])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="LinMU end to end on a synthetic video task, on CPU: train a tiny "
                                                 "attention teacher, convert it, run the three distillation stages "
                                                 "and the ablations, print a table of held-out accuracies.",
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--seed", type=int, default=0, help="seed of the data, the teacher and the distillation")
    parser.add_argument("--seeds", type=int, default=1,
                        help="run the whole experiment for this many seeds (--seed, --seed + 1, ...) and report "
                             "each row's mean and standard deviation across them")
    parser.add_argument("--quick", action="store_true", help="a shortened run (a few steps per phase, for tests)")
    parser.add_argument("--experiment", choices=list(EXPERIMENTS), default="recipes",
                        help="recipes: the three stages and the ablations; local: two shapes walk at once, "
                             "so a move is told only by which shape of the frame before stood next to the "
                             "answered cell (the full recipe and Flex-MA only, each with and without Rotary "
                             "Major-Scan; the teacher trains twice as long); sweep: the full recipe under each setting "
                             "of SWEEP (KL temperature and weight, Flex-MA's dt/A spread, the hidden-state target), "
                             "how the "
                             "defaults were chosen; long: every row of recipes, with four times the stage-2 steps")
    parser.add_argument("--out", help="also write the results (each seed's rows, the summary, settings, wall time) "
                                      "to this JSON file, rewritten after every seed")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="run nothing: print the table of earlier runs from their --out files, one experiment's "
                             "seeds run apart (for example side by side, one process and OMP_NUM_THREADS=1 each), "
                             "as one --seeds run of them would print it")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, not {args.seeds}")
    if args.table:
        if others := [f"--{name}" for name, value in vars(args).items()
                      if name != "table" and value != parser.get_default(name)]:
            parser.error(f"--table prints earlier runs and takes no other flag: leave out {', '.join(others)}")
        try:
            print(report(load_runs(args.table)))
        except ValueError as error:
            parser.error(f"--table: {error}")
        return
    task, recipes, settings = EXPERIMENTS[args.experiment]
    results = []
    for seed in range(args.seed, args.seed + args.seeds):
        results.append(run(QUICK if args.quick else settings, seed, recipes, task))
        if args.out:  # after every seed, atomically: an interrupted run keeps the seeds it finished
            write_json(args.out, {"summary": summarize(results), "runs": results})
    print(report(results))


if __name__ == "__main__":
    main()
