"""LinMU's three-stage distillation framework: a converted student learns to match its frozen teacher.

    python convert.py                 # once: SmolVLM2-256M -> checkpoints/linmu-smolvlm2-256m
    python distill.py --stage 1       # Flex-MA alone          -> checkpoints/distill/stage1
    python distill.py --stage 2       # Flex-MA + Local-Swin   -> checkpoints/distill/stage2
    python distill.py --stage 3       # LoRA on the rest       -> checkpoints/distill/stage3

Stage 1 trains only the Flex-MA branch of every M-MATE layer, which alone mixes tokens (Local-Swin
off); stage 2 switches Local-Swin on and trains both branches and their gate; stage 3 freezes the
mixers and fine-tunes the MLPs and the vision connector through LoRA adapters (norms, embeddings
and the vision encoder stay frozen). Every other weight is the teacher's and stays frozen.

The loss, in every stage, with the frozen teacher run under no_grad on the same batch:
  * hidden-state regression, per decoder layer l: ||h_s - h_t||^2 / ||h_t||^2 summed over the
    real tokens of the batch (a relative squared error, so layers with a larger residual stream
    do not dominate), averaged over layers, weighted by --hidden-weight;
  * token-level logit distillation: KL(teacher || student) of the next-token distributions at
    temperature T, times T^2, averaged over the real (non-padding) tokens, weighted by --kl-weight.
--hidden-target chooses where a student layer's input comes from. "layer" (default, layer-local, as
MOHAWK and MaTVLM do): student layer l reads the teacher's hidden input to layer l, so each layer
learns to replace its own attention, independently of the others. "stream": the student's own
running residual stream, as at inference, so layers learn to correct each other's errors.
The logit term always runs the student end to end. toy.py measures both choices.

Checkpoints are the Hub layout (config.json + model.safetensors + tokenizer files, loadable by
`python generate.py --model`, bench.py and the next stage) plus trainer.pt (the trained tensors,
optimizer, schedule, step and RNG state), written atomically; --resume continues a stage exactly.

A step trains on a global batch of --batch-size x ranks x --grad-accum samples, and its loss is
that of the global batch taken as one batch, however it is split. `torchrun --nproc_per_node=N
distill.py ...` (and --nnodes for several machines) runs N ranks under DistributedDataParallel, NCCL
on CUDA and gloo on a CPU; each rank takes its share of every global batch, rank 0 alone logs and
writes checkpoints. A DataLoader's --workers prepare the batches ahead of the step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import random
import resource
import statistics
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import flops
from convert import DEFAULT_STUDENT, DEFAULT_TEACHER
from cli import InputError, check_bounds, check_device, default_device, user_errors
from linmu import TokenLayout, add_lora, merge_lora, trainable_parameters
from smolvlm import (VLM, VLMConfig, check_checkpoint, convert_to_linmu, load_model, read_config, resolve_checkpoint,
                     save_model)
from speed import Tuning, compile_for_distillation, tune, tuning_for

DEFAULT_OUT = "checkpoints/distill"
SMOKE_CONFIG = Path(__file__).parent / "configs" / "smolvlm2-256m.json"
SMOKE_STEPS = 5
LORA_TARGETS = ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "modality_projection.proj"]
STAGE_LR = {1: 1e-3, 2: 5e-4, 3: 2e-4}
Batch = dict  # input_ids (B, L), attention_mask (B, L), pixel_values, pixel_attention_mask, grids


class DivergenceError(RuntimeError):
    """The loss became NaN or infinite."""


@dataclass
class DistillConfig:
    """One stage's training settings (the command-line flags of the same names)."""

    stage: int = 1
    steps: int = 200
    batch_size: int = 2
    grad_accum: int = 1
    lr: float | None = None  # None: STAGE_LR[stage]
    warmup: int = 20
    weight_decay: float = 0.01
    clip: float = 1.0
    temperature: float = 4.0  # T and the KL weight: the best of toy.py's sweep (README)
    hidden_weight: float = 1.0
    kl_weight: float = 3.0
    hidden_target: str = "layer"
    branches: str | None = None  # None: "flex" in stage 1, "both" after; ablations force one branch
    lora_rank: int = 8
    lora_alpha: float = 16.0
    eval_every: int = 50
    save_every: int = 100
    compile: bool = False
    grad_checkpointing: bool = False
    seed: int = 0

    @property
    def learning_rate(self) -> float:
        return self.lr if self.lr is not None else STAGE_LR[self.stage]


# ----------------------------------------------------------------------------------------------
# Ranks: one process (`python distill.py`), or torchrun's


def rank_and_world() -> tuple[int, int]:
    """This process's rank and the number of ranks: torchrun's, or (0, 1) without it."""
    return (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)


def sum_over_ranks(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor summed over the ranks, in place (on the rank's device, as NCCL needs)."""
    if dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor


def stop_together(error: InputError | None) -> None:
    """Raise a rank's error on every rank. One rank's bad sample must stop them all, with its line printed
    once by rank 0, rather than leave the others waiting for that rank in the step's all-reduce."""
    if dist.is_initialized():
        errors = [None] * dist.get_world_size()
        dist.all_gather_object(errors, None if error is None else str(error))
        error = next((InputError(e) for e in errors if e is not None), None)
    if error is not None:
        raise error


# ----------------------------------------------------------------------------------------------
# What each stage trains


def prepare_stage(student: VLM, cfg: DistillConfig) -> dict[str, torch.nn.Parameter]:
    """Freeze the student, switch its M-MATE branches and unfreeze (or adapt) what the stage trains.

    Returns the trainable parameters by name. Stage 1: Flex-MA; stage 2: the active branches and,
    with both on, the gate; stage 3: new LoRA adapters on LORA_TARGETS.
    """
    branches = cfg.branches or ("flex" if cfg.stage == 1 else "both")
    if cfg.stage == 1 and branches != "flex":
        raise InputError("stage 1 trains Flex-MA alone: leave --branches unset or set it to flex")
    student.requires_grad_(False)
    for layer in student.model.text_model.layers:
        mixer = layer.self_attn
        mixer.branches = branches
        if cfg.stage in (1, 2):
            mixer.flex.requires_grad_(branches != "swin")
            mixer.swin.requires_grad_(branches != "flex")
            mixer.gate.requires_grad_(branches == "both")
    if cfg.stage == 3:
        add_lora(student, LORA_TARGETS, cfg.lora_rank, cfg.lora_alpha)
    student.model.text_model.gradient_checkpointing = cfg.grad_checkpointing
    return trainable_parameters(student)


# ----------------------------------------------------------------------------------------------
# The loss


@torch.no_grad()
def teacher_pass(teacher: VLM, batch: Batch):
    """The frozen teacher's output on a batch, hidden states included: what the student's loss regresses.
    Its vision_states, the vision encoder's output, is what the student reads (student_inputs)."""
    return teacher(**{k: batch.get(k) for k in ("input_ids", "pixel_values", "pixel_attention_mask", "grids")},
                   output_hidden_states=True)


def student_inputs(batch: Batch, target) -> dict:
    """What the student reads of a batch: its tokens and grids, and the teacher's vision_states in place of
    its pixels (target: teacher_pass's output). The student's vision encoder is the teacher's, frozen in
    every stage (check_shared_vision), so it runs once for both."""
    return {"input_ids": batch["input_ids"], "grids": batch.get("grids"), "vision_states": target.vision_states}


def check_shared_vision(student: VLM, teacher: VLM) -> None:
    """InputError unless the student's vision encoder is the teacher's, as conversion leaves it."""
    mine, theirs = student.model.vision_model.state_dict(), teacher.model.vision_model.state_dict()
    if mine.keys() != theirs.keys() or not all(torch.equal(mine[k], theirs[k].to(mine[k].dtype)) for k in mine):
        raise InputError("the student's vision encoder is not the teacher's, which distillation runs for both: "
                         "pass the --teacher the student was converted from")


def relative_error(student: torch.Tensor, teacher: torch.Tensor, mask: torch.Tensor,
                   norm: torch.Tensor) -> torch.Tensor:
    """sum ||s - t||^2 over the real tokens / norm (the step's sum ||t||^2): (B, L, D), (B, L, D), (B, L) -> scalar."""
    diff = (student.float() - teacher.float()).pow(2).sum(-1)
    return (diff * mask).sum() / norm


def token_kl(student_logits: torch.Tensor, teacher_logits: torch.Tensor, mask: torch.Tensor,
             temperature: float, tokens: torch.Tensor | None = None) -> torch.Tensor:
    """KL(teacher || student) per token at a temperature, times T^2, summed over the real tokens and divided
    by `tokens`: by default the batch's real tokens (a per-token mean); a step passes its global batch's."""
    t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    per_token = (t.exp() * (t - s)).sum(-1)  # (B, L)
    return (per_token * mask).sum() / (mask.sum() if tokens is None else tokens) * temperature**2


def loss_normalizers(target, batch: Batch) -> torch.Tensor:
    """The denominators of the loss on a batch: its real tokens, and each decoder layer's sum of ||h_t||^2
    over them (target: teacher_pass's output) -> (1 + layers,). A step adds them up over its micro-batches
    and ranks before it takes any loss, so that its loss is that of its global batch as one batch."""
    mask = batch["attention_mask"].to(torch.float32)
    norms = [(h.float().pow(2).sum(-1) * mask).sum() for h in target.hidden_states[1:]]
    return torch.stack([mask.sum(), *norms])


def student_hidden_states(student: VLM, teacher_hidden: list[torch.Tensor], batch: Batch,
                          cfg: DistillConfig, stream: list[torch.Tensor] | None) -> list[torch.Tensor]:
    """The student's output of every decoder layer: fed the teacher's input to that layer ("layer")
    or read off its own end-to-end pass ("stream")."""
    if cfg.hidden_target == "stream":
        return stream[1:]
    text = student.model.text_model
    layout = TokenLayout.build(batch["input_ids"], student.config.image_token_id, batch["grids"])
    plans = text.plan(layout, teacher_hidden[0].dtype)
    return [layer(h, plan)[0] for layer, plan, h in zip(text.layers, plans, teacher_hidden[:-1])]


def distill_loss(model: VLM | DistributedDataParallel, target, batch: Batch, cfg: DistillConfig,
                 scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """A batch's share of its step's loss -> (loss, its terms [loss, hidden, kl] detached).

    model: the student, or DDP around it; target: teacher_pass's output on the batch; scales:
    loss_normalizers summed over the step's micro-batches and ranks. The errors are summed over the
    batch's real tokens and divided by the step's totals, so that the shares of a step add up to its loss.
    """
    student = model.module if isinstance(model, DistributedDataParallel) else model
    mask = batch["attention_mask"].to(torch.float32)
    out = model(**student_inputs(batch, target), output_hidden_states=cfg.hidden_target == "stream")
    hidden = student_hidden_states(student, target.hidden_states, batch, cfg, out.hidden_states)
    tokens, norms = scales[0], scales[1:]
    hidden_loss = torch.stack([relative_error(s, t, mask, norm)
                               for s, t, norm in zip(hidden, target.hidden_states[1:], norms)]).mean()
    kl = token_kl(out.logits, target.logits, mask, cfg.temperature, tokens)
    loss = cfg.hidden_weight * hidden_loss + cfg.kl_weight * kl
    return loss, torch.stack([loss, hidden_loss, kl]).detach()


@torch.no_grad()
def evaluate(student: VLM, teacher: VLM, batches: list[Batch]) -> dict[str, float]:
    """Held-out agreement with the teacher: per-layer hidden-state cosine similarity, KL and top-1
    next-token agreement, each averaged over real tokens. Under torchrun each rank evaluates its share
    of the batches, and the sums are added up over the ranks. Compiled models run it eagerly: a few
    batches now and then, whose graphs (without gradients) would take longer to compile than to run."""
    with torch.compiler.set_stance("force_eager"):
        return agreement(student, teacher, batches)


def agreement(student: VLM, teacher: VLM, batches: list[Batch]) -> dict[str, float]:
    rank, world = rank_and_world()
    totals = {"cosine": 0.0, "kl": 0.0, "top1": 0.0}
    tokens = 0.0
    for batch in batches[rank::world]:
        mask = batch["attention_mask"].to(torch.float32)
        t = teacher_pass(teacher, batch)
        s = student(**student_inputs(batch, t), output_hidden_states=True)
        cosine = torch.stack([F.cosine_similarity(a.float(), b.float(), dim=-1)
                              for a, b in zip(s.hidden_states[1:], t.hidden_states[1:])]).mean(0)
        n = mask.sum().item()
        totals["cosine"] += (cosine * mask).sum().item()
        totals["kl"] += token_kl(s.logits, t.logits, mask, 1.0).item() * n
        totals["top1"] += ((s.logits.argmax(-1) == t.logits.argmax(-1)) * mask).sum().item()
        tokens += n
    sums = torch.tensor([*totals.values(), tokens], dtype=torch.float64, device=next(student.parameters()).device)
    *sums, tokens = sum_over_ranks(sums).tolist()
    return {k: v / tokens for k, v in zip(totals, sums)}


TRAINED_PARTS = {1: ("flex", "flex conv"), 2: ("flex", "flex conv", "swin", "gate"), 3: ()}  # flops.decoder_flops


def step_flops(teacher: VLMConfig, student: VLMConfig, batch: Batch, cfg: DistillConfig, settings: Tuning) -> int:
    """The model FLOPs of a training step's work on one micro-batch, counted from the sizes (flops.py), as
    FlopCounterMode counts them (matrix products) and Flex-MA's convolution: the vision encoder once (both
    models read its output) and each model's connector; the teacher's forward; the student's forward end
    to end, its M-MATE branches as the stage runs them, and with layer-local targets (cfg.hidden_target)
    once more layer by layer, without the head. A student pass's backward takes the gradients of the
    inputs of every product its loss reaches, save the input projections of a layer whose input has none
    (the first layer's end to end, every layer's in the layer-local pass), and those of the trained
    parts' weights and, in Flex-MA's scan, of the second operands: once more the trained parts' forward.
    Stage 3's LoRA adapters (rank r products) are left out. batch: its input_ids (B, L) and grids, on any
    device; settings: the student's Tuning (its scan's work)."""
    image = teacher.image_token_id
    input_ids = batch["input_ids"].cpu()
    images = int((input_ids == image).sum()) // teacher.image_seq_len
    vision = flops.vision_flops(teacher, images)
    total = vision["vision"] + 2 * vision["connector"]
    branches = cfg.branches or ("flex" if cfg.stage == 1 else "both")
    student = replace(student, linmu=replace(student.linmu, branches=branches))
    text, layers = student.text, student.text.num_hidden_layers
    H, kv, Dh = text.num_attention_heads, text.num_key_value_heads, text.head_dim
    projections = {"flex": H * Dh * 4 + H, "swin": (H + 2 * kv) * Dh, "both": H * Dh * 4 + H + (H + 2 * kv) * Dh + 1}
    for ids, grids in zip(input_ids, batch.get("grids") or [[] for _ in input_ids]):
        visual, length = ids == image, len(ids)
        total += sum(flops.decoder_flops(teacher, layers, visual, grids, settings, length).values())
        parts = flops.decoder_flops(student, layers, visual, grids, settings, length)
        forward, trained = sum(parts.values()), sum(parts.get(p, 0) for p in TRAINED_PARTS[cfg.stage])
        inputs = 2 * length * text.hidden_size * projections[branches]  # a layer's input projections
        total += forward + (forward - inputs + trained)
        if cfg.hidden_target == "layer":
            total += (forward - parts["head"]) + (forward - parts["head"] - layers * inputs + trained)
    return total


# ----------------------------------------------------------------------------------------------
# The training loop


def cosine_schedule(cfg: DistillConfig) -> Callable[[int], float]:
    """Linear warm-up to the learning rate, then a cosine decay to zero at the last step."""
    def factor(step: int) -> float:
        if step < cfg.warmup:
            return (step + 1) / cfg.warmup
        progress = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
        return 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return factor


def make_optimizer(params: dict[str, torch.nn.Parameter], cfg: DistillConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only (not on biases, norms, A_log, D, dt_bias, z_bias)."""
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=cfg.learning_rate, betas=(0.9, 0.95))


def save_checkpoint(student: VLM, out_dir: Path, source: Path | None, params: dict, optimizer, scheduler,
                    step: int, cfg: DistillConfig) -> None:
    """A loadable model (LoRA merged into a copy in stage 3) plus trainer.pt, as one atomic directory.
    trainer.pt records the number of ranks, so that --resume can tell a global batch split another way."""
    model = student
    if cfg.stage == 3:
        model = copy.deepcopy(student)
        merge_lora(model)
    trainer = {"step": step, "config": asdict(cfg), "world_size": rank_and_world()[1],
               "trained": {k: p.detach().cpu() for k, p in params.items()},
               "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
               "rng": {"torch": torch.get_rng_state(), "python": random.getstate(),
                       "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}}
    save_model(model, out_dir, source=source, extra={"trainer.pt": trainer})


def restore_checkpoint(out_dir: Path, params: dict, optimizer, scheduler, cfg: DistillConfig,
                       log: Callable[[str], None]) -> int:
    """Load trainer.pt of out_dir into the trained parameters, optimizer, schedule and RNGs -> next step.

    The global batch (--batch-size x ranks x --grad-accum) must be the checkpoint's, so that each step
    trains on the samples it would have. Split the same way, the run continues bitwise; split another
    way, it continues correctly but not bitwise (its sums add up in another order), and says so.
    """
    path = out_dir / "trainer.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: no {path}; run the stage without --resume first")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state["trained"].keys() != params.keys():
        raise InputError(f"--resume: {path} trained other parameters than this stage; check --stage and --branches")
    world = rank_and_world()[1]
    split = (world, cfg.batch_size, cfg.grad_accum)
    ranks = state.get("world_size", 1)  # trainer.pt files from before torchrun have no world_size: one process
    saved = (ranks, state["config"]["batch_size"], state["config"]["grad_accum"])
    describe = "{} ranks x --batch-size {} x --grad-accum {}".format
    if math.prod(split) != math.prod(saved):
        samples = math.prod(saved)
        if samples % world:
            raise InputError(f"--resume: {path} trained on a global batch of {samples} samples, which {world} ranks "
                             f"cannot share: resume on a number of ranks that divides {samples}")
        raise InputError(f"--resume: {path} trained on a global batch of {samples} samples ({describe(*saved)}): "
                         f"keep it, with --batch-size x --grad-accum = {samples // world} on {world} ranks")
    if split != saved:
        log(f"--resume: {path} was trained as {describe(*saved)}, this run is {describe(*split)}: the same "
            "global batches, so training continues correctly, but not bitwise as a run split one way throughout")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state["trained"][name])
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    torch.set_rng_state(state["rng"]["torch"])
    random.setstate(state["rng"]["python"])
    if state["rng"]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"]["cuda"])
    return state["step"]


def accumulate_gradients(model: VLM | DistributedDataParallel, teacher: VLM, batches: list[Batch],
                         cfg: DistillConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward over this rank's micro-batches of a step -> the step's [loss, hidden, kl] and
    real tokens, summed over the ranks.

    The teacher runs on all of them first, so that the loss's normalizers are the global batch's (its
    outputs on the rank's micro-batches are held at once: logits and hidden states, a fraction of what
    a student pass keeps for its backward). Then each micro-batch's share of the loss is backpropagated.
    DDP averages the gradients over the ranks in the last micro-batch's backward (no_sync before it), so
    the shares are multiplied by the number of ranks: the gradients are those of the global batch as one batch.
    """
    world = rank_and_world()[1]
    on_cuda = next(teacher.parameters()).device.type == "cuda"
    with torch.autocast("cuda", torch.bfloat16, enabled=on_cuda):  # bf16 on CUDA, float32 on CPU
        targets = [teacher_pass(teacher, batch) for batch in batches]
    scales = sum_over_ranks(sum(loss_normalizers(target, batch) for target, batch in zip(targets, batches)))
    terms = 0
    for micro, (batch, target) in enumerate(zip(batches, targets)):
        syncs = not isinstance(model, DistributedDataParallel) or micro + 1 == len(batches)
        with contextlib.nullcontext() if syncs else model.no_sync():
            with torch.autocast("cuda", torch.bfloat16, enabled=on_cuda):
                loss, share = distill_loss(model, target, batch, cfg, scales)
            (loss * world).backward()
        terms = terms + share
    return sum_over_ranks(terms), scales[0]


def micro_batch_indices(step: int, cfg: DistillConfig, rank: int, world: int) -> list[int]:
    """The micro-batches a rank trains on at a step: step s takes micro-batches s G to s G + G - 1,
    G = cfg.grad_accum x ranks, and rank r every ranks-th of them from s G + r on."""
    return [(step * cfg.grad_accum + micro) * world + rank for micro in range(cfg.grad_accum)]


def train_stage(student: VLM, teacher: VLM, batch_at: Callable[[int], Batch], eval_batches: list[Batch],
                cfg: DistillConfig, out_dir: Path | None = None, source: Path | None = None,
                resume: bool = False, log: Callable[[str], None] = tqdm.write) -> dict:
    """Run one distillation stage: cfg.steps optimizer steps, each over cfg.grad_accum micro-batches per rank.

    batch_at(i) gives micro-batch i (the same i always gives the same batch, so a resumed run sees
    the data the interrupted one would have); a step takes micro_batch_indices'. Under torchrun the
    student trains wrapped in DDP. Evaluates every cfg.eval_every steps and at the end; rank 0 saves
    every cfg.save_every steps and at the end (if out_dir).

    The loop does not wait for a step's work to queue the next: a step's loss is read once the next step
    is queued (the device still has that one to run), and before an evaluation or a checkpoint. So a NaN
    loss stops the stage a step late, its weights already spoiled in memory, but never written: the last
    checkpoint was saved after reading every loss before it. (Preparing each prompt still waits on the
    device, PromptPlan.build.)
    With cfg.compile, the first step's batches run once through forward and backward before the first
    step, untimed as a step and timed as the compilation ("compile_seconds"; new kinds of prompt may
    still compile later, within their step's time).
    Returns the last evaluation with the training-loss history, each step's real tokens (the global
    batch's), each step's seconds (its batches, forward, backward and update, as the host saw them:
    paced by the loss read a step late) and the seconds of each spent waiting for its batches.
    """
    rank, world = rank_and_world()
    params = prepare_stage(student, cfg)
    optimizer = make_optimizer(params, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, cosine_schedule(cfg))
    first = restore_checkpoint(out_dir, params, optimizer, scheduler, cfg, log) if resume else 0
    if cfg.compile:  # whole layers with dynamic shapes: one compilation serves every batch's length
        compile_for_distillation(student, teacher)
    model = student  # what the steps run: under torchrun, DDP around the student
    if dist.is_initialized():
        # DDP wraps the student after its layers are compiled: its gradient hooks stay outside the compiled
        # graphs, which stay whole (fullgraph), where compiling the wrapped model would split them at DDP's
        # gradient buckets. A batch without images leaves parameters unused (Flex-MA's backward convolution,
        # the connector's adapters), which DDP must expect; it warns once per rank when a first step used all.
        model = DistributedDataParallel(student, find_unused_parameters=True)
    history, tokens_seen, step_seconds, data_seconds, compile_seconds = [], [], [], [], None
    student.train()
    # A context: closed (its line ended) on an error too, before the error's line is printed.
    with tqdm(range(first, cfg.steps), initial=first, total=cfg.steps, desc=f"stage {cfg.stage}") as bar:

        def read(queued: tuple[int, torch.Tensor, torch.Tensor]) -> None:
            """Take in a queued step's [loss, hidden, kl] and real tokens, once its work is done."""
            step, terms, tokens = queued
            loss, hidden, kl, count = torch.cat([terms, tokens[None]]).tolist()
            if not math.isfinite(loss):
                where = f"; the last good checkpoint in {out_dir} is intact" if out_dir else ""
                raise DivergenceError(f"stage {cfg.stage}: loss is {loss} at step {step} (hidden {hidden}, kl {kl}): "
                                      f"lower --lr (now {cfg.learning_rate:g}) or check the data{where}")
            history.append(loss)
            tokens_seen.append(int(count))
            bar.set_postfix(loss=f"{loss:.4f}", hidden=f"{hidden:.4f}", kl=f"{kl:.4f}",
                            wait=f"{data_seconds[-1]:.2f}s")

        queued = None  # the step before, not read yet
        for step in bar:
            started = time.perf_counter()
            try:
                batches, error = [batch_at(i) for i in micro_batch_indices(step, cfg, rank, world)], None
            except InputError as bad_sample:
                batches, error = [], bad_sample
            stop_together(error)
            data_seconds.append(time.perf_counter() - started)
            if cfg.compile and compile_seconds is None:
                compile_seconds = compile_on(model, teacher, batches, cfg)
                log(f"stage {cfg.stage}: compiled in {compile_seconds:.1f} s (torch.compile, on the first step's "
                    "batches, forward and backward)")
                started = time.perf_counter() - data_seconds[-1]  # the step: its batches, then its work
            optimizer.zero_grad(set_to_none=True)
            terms, tokens = accumulate_gradients(model, teacher, batches, cfg)
            torch.nn.utils.clip_grad_norm_(list(params.values()), cfg.clip)
            optimizer.step()
            scheduler.step()
            if queued is not None:
                read(queued)
            queued = (step, terms, tokens)
            last = step + 1 == cfg.steps
            evaluating = eval_batches and not last and cfg.eval_every and (step + 1) % cfg.eval_every == 0
            saving = out_dir is not None and (last or (cfg.save_every and (step + 1) % cfg.save_every == 0))
            if last or evaluating or saving:  # on every rank alike: a NaN stops them at the same step
                read(queued)
                queued = None
            step_seconds.append(time.perf_counter() - started)
            if evaluating:
                student.eval()
                report(cfg.stage, step + 1, evaluate(student, teacher, eval_batches), log)
                student.train()
            if saving and rank == 0:
                save_checkpoint(student, out_dir, source, params, optimizer, scheduler, step + 1, cfg)
    student.eval()
    if cfg.stage == 3:
        merge_lora(student)
    final = evaluate(student, teacher, eval_batches) if eval_batches else {}
    if final:
        report(cfg.stage, cfg.steps, final, log)
    return {**final, "losses": history, "tokens": tokens_seen, "step_seconds": step_seconds,
            "data_seconds": data_seconds, "compile_seconds": compile_seconds}


def compile_on(model: VLM | DistributedDataParallel, teacher: VLM, batches: list[Batch], cfg: DistillConfig) -> float:
    """Run a step's forward and backward on its batches and wait for them: the seconds torch.compile's first
    compilation takes (with one such pass). The step's own zero_grad then drops these gradients."""
    started = time.perf_counter()
    accumulate_gradients(model, teacher, batches, cfg)
    device = next(teacher.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - started


def report(stage: int, step: int, metrics: dict, log: Callable[[str], None]) -> None:
    log(f"stage {stage} step {step}: held-out hidden cosine {metrics['cosine']:.4f}  KL {metrics['kl']:.4f}  "
        f"top-1 agreement {metrics['top1']:.3f}")


# ----------------------------------------------------------------------------------------------
# Data: a JSONL file of samples, or a small synthetic set


def read_jsonl(path: str | Path) -> list[dict]:
    """One JSON object per line: {"image": path} or {"images": [paths]} or {"video": path (a file, or
    a folder of frames)}, with "prompt": the user's text and, optionally, "response": the assistant's
    answer (distilled too when given). Relative paths are relative to the JSONL file's folder.
    InputError, naming the line, for a line that is not such an object or names a missing file; each
    sample keeps its line ("where", path:number), for an error found when it is decoded."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--data {path} does not exist: give a JSONL file of samples (see distill.py --help)")
    samples = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            sample = json.loads(line)
        except json.JSONDecodeError as error:
            raise InputError(f"{path}:{number}: not JSON ({error.msg})") from None
        if not isinstance(sample, dict) or not isinstance(sample.get("prompt"), str):
            raise InputError(f"{path}:{number}: a sample is a JSON object with a \"prompt\" string")
        images = sample.get("images", [sample["image"]] if "image" in sample else [])
        if not (isinstance(images, list) and all(isinstance(v, str) for v in images)
                and all(isinstance(sample.get(key, ""), str) for key in ("video", "response"))):
            raise InputError(f"{path}:{number}: \"image\", \"video\" and \"response\" are strings, "
                             "\"images\" a list of strings")
        sample["images"], sample["where"] = [path.parent / p for p in images], f"{path}:{number}"
        if "video" in sample:
            sample["video"] = path.parent / sample["video"]
        for file in sample["images"] + ([sample["video"]] if "video" in sample else []):
            if not file.exists():
                raise InputError(f"{path}:{number}: {file} does not exist (paths are relative to the JSONL file)")
        samples.append(sample)
    if not samples:
        raise InputError(f"{path} holds no samples")
    return samples


def synthetic_samples(count: int, seed: int) -> list[dict]:
    """Procedural samples, so that distillation runs anywhere: images of coloured rectangles on a
    gradient and 8-frame videos of a square crossing a gradient, each with a question."""
    from processing import Video

    g = torch.Generator().manual_seed(seed)
    prompts = ["Describe this image.", "What shapes and colours do you see?", "Where is the largest shape?"]

    def canvas(height: int, width: int) -> torch.Tensor:
        ramp = torch.linspace(0, 1, width)[None, None, :] * torch.rand(3, 1, 1, generator=g)
        return (ramp.expand(3, height, width) * 255).clone()

    samples = []
    for i in range(count):
        if i % 4 == 3:
            frames = []
            x, y, size = (int(v) for v in torch.randint(0, 200, (3,), generator=g))
            color = torch.rand(3, 1, 1, generator=g) * 255
            for t in range(8):
                frame = canvas(256, 384)
                frame[:, y // 2:y // 2 + 40 + size // 4, x + 20 * t:x + 20 * t + 40 + size // 4] = color
                frames.append(frame)
            video = Video(torch.stack(frames).to(torch.uint8), [float(t) for t in range(8)], 8.0)
            samples.append({"video": video, "prompt": "What happens in this video?", "where": f"synthetic sample {i}"})
        else:
            image = canvas(int(torch.randint(200, 600, ())), int(torch.randint(200, 600, ())))
            for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
                top, left, h, w = (int(v) for v in torch.randint(0, 180, (4,), generator=g))
                image[:, top:top + h + 20, left:left + w + 20] = torch.rand(3, 1, 1, generator=g) * 255
            samples.append({"images": [image.to(torch.uint8)], "prompt": prompts[i % len(prompts)],
                            "where": f"synthetic sample {i}"})
    return samples


class MicroBatches(Dataset):
    """Micro-batch i of an endless sequence of seeded per-epoch shuffles of the samples (with shuffle
    off: one pass in order, len() micro-batches), put through the processor (chat template, image
    tiling, video frames) and collated: what a DataLoader worker prepares. The order is a function of
    the seed and i alone. A sample the processor cannot read comes back as an InputError naming it and
    its JSONL line, for the training process to raise: raised in a worker, it would reach that process
    wrapped in the worker's traceback."""

    def __init__(self, samples: list[dict], processor, batch_size: int, seed: int, shuffle: bool):
        self.samples, self.processor, self.batch_size = samples, processor, batch_size
        self.seed, self.shuffle = seed, shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.samples) / self.batch_size)

    def sample_indices(self, index: int) -> list[int]:
        n = len(self.samples)
        picks = []
        for k in range(index * self.batch_size, (index + 1) * self.batch_size):
            epoch, position = divmod(k, n) if self.shuffle else (0, k)
            if position >= n:
                break
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + epoch)) if self.shuffle \
                else torch.arange(n)
            picks.append(int(order[position]))
        return picks

    def __getitem__(self, index: int) -> Batch | InputError:
        prepared = []
        for k in self.sample_indices(index):
            try:
                prepared.append(self.process(self.samples[k]))
            except (InputError, OSError) as error:
                return InputError(f"{self.samples[k]['where']}: {error}")
        return self.processor.collate(prepared)

    def process(self, sample: dict) -> dict:
        content = [{"type": "image"} for _ in sample.get("images", [])]
        content += [{"type": "video"}] if sample.get("video") is not None else []
        messages = [{"role": "user", "content": content + [{"type": "text", "text": sample["prompt"]}]}]
        if sample.get("response"):
            messages.append({"role": "assistant", "content": [{"type": "text", "text": sample["response"]}]})
        return self.processor(messages, images=sample.get("images", []), video=sample.get("video"),
                              add_generation_prompt=not sample.get("response"))


def as_collated(batch: Batch | InputError) -> Batch | InputError:
    """The DataLoader's collate_fn: MicroBatches collates (the default would turn the grids' tuples into lists)."""
    return batch


class SampleBatches:
    """batch_at(i): MicroBatches' micro-batch i on the device, prepared by a DataLoader whose `workers`
    processes prepare the next ones while the step runs (0: the calling process prepares each when asked).

    A rank asks for i, i + stride, i + 2 stride, ... (its share of every step's micro-batches): one pass
    of the loader, its sampler that sequence, serves them in turn; asked for any other index, a new pass
    starts there. Pinned memory on CUDA, so that the copy to the device does not wait on the step.
    """

    def __init__(self, samples: list[dict], processor, batch_size: int, seed: int, device: str, shuffle: bool = True,
                 workers: int = 0, stride: int = 1):
        self.dataset = MicroBatches(samples, processor, batch_size, seed, shuffle)
        self.device, self.workers, self.stride = torch.device(device), workers, stride
        self.batches, self.next_index = None, None

    def __len__(self) -> int:
        return len(self.dataset)

    def __call__(self, index: int) -> Batch:
        if index != self.next_index:
            end = sys.maxsize if self.dataset.shuffle else len(self.dataset)
            # A generator of its own: each pass draws a seed for its workers, which must not move the global
            # RNG (it initializes stage 3's adapters, and --resume restores it).
            self.batches = iter(DataLoader(self.dataset, batch_size=None, sampler=range(index, end, self.stride),
                                           num_workers=self.workers, collate_fn=as_collated,
                                           pin_memory=self.device.type == "cuda",
                                           generator=torch.Generator().manual_seed(self.dataset.seed)))
        self.next_index = index + self.stride
        batch = next(self.batches)
        if isinstance(batch, InputError):
            raise batch
        return {k: v.to(self.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# A full-size smoke run on random weights (--smoke): does stage 1 run here, how fast, in how much memory?


def write_random_teacher(directory: Path, config_file: Path, seed: int) -> VLM:
    """A SmolVLM2 teacher of a config.json's sizes with random weights, written in the Hub layout (no download).

    With the stand-in tokenizer (processing.write_stand_in_tokenizer; the config's image_token_id
    becomes its <image> id) and a preprocessor config scaled to the config's tile, as SmolVLM2-256M's
    is to its 512 px: images resized to 4 tiles on their longest edge, video frames to one tile.
    """
    from processing import IMAGE_TOKEN, write_stand_in_tokenizer

    config = read_config(config_file, expect="teacher")
    directory.mkdir(parents=True)
    tokenizer = write_stand_in_tokenizer(directory)
    if config.text.vocab_size < tokenizer.get_vocab_size():
        raise InputError(f"--config {config_file}: vocab_size {config.text.vocab_size} is smaller than the stand-in "
                         f"tokenizer's {tokenizer.get_vocab_size()} tokens: raise it")
    tile = config.vision.image_size
    (directory / "preprocessor_config.json").write_text(json.dumps({
        "size": {"longest_edge": 4 * tile}, "max_image_size": {"longest_edge": tile},
        "video_sampling": {"fps": 1, "max_frames": 64, "video_size": {"longest_edge": tile}}}))
    torch.manual_seed(seed)
    teacher = VLM(replace(config, image_token_id=tokenizer.token_to_id(IMAGE_TOKEN)))
    save_model(teacher, directory, source=directory)
    return teacher


def smoke(args: argparse.Namespace) -> dict:
    """--smoke: build a random-weight teacher of --config's sizes and its converted student in a temporary
    directory, run stage 1 on them as `--stage 1 --student S --teacher T` would (every other flag as
    given), and print what it takes: the compilation (with --compile), the steady step's time (the
    median of the steps after the first), the real tokens and model FLOPs (step_flops) it trains on
    per second, their share of the device's peak (model FLOP utilisation: --peak-tflops, or a known
    CUDA card's bfloat16 figure in configs/cards.json; none is guessed), and the peak memory.
    Returns the stage's result."""
    cfg = stage_config(args)
    device = check_device(args.device)
    with tempfile.TemporaryDirectory(prefix="linmu-smoke-") as tmp:
        teacher = write_random_teacher(Path(tmp) / "teacher", Path(args.config), cfg.seed)
        student = convert_to_linmu(teacher)
        save_model(student, Path(tmp) / "student", source=Path(tmp) / "teacher")
        millions = lambda model: sum(p.numel() for p in model.parameters()) / 1e6
        print(f"smoke: random-weight teacher of {args.config}'s sizes ({millions(teacher):.1f}M parameters) and its "
              f"LinMU student ({millions(student):.1f}M) in {tmp} (removed afterwards); stage 1 on {device}, "
              f"{'bf16 autocast' if device.type == 'cuda' else 'float32'}, "
              f"{'compiled' if cfg.compile else 'eager'}, batch {cfg.batch_size} x {cfg.grad_accum}", flush=True)
        del teacher, student
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        result = run_stage(argparse.Namespace(**{**vars(args), "student": str(Path(tmp) / "student"),
                                                 "teacher": str(Path(tmp) / "teacher"), "out": str(Path(tmp) / "out")}),
                           count_work=True)
    if result["compile_seconds"] is not None:
        print(f"smoke: compiled in {result['compile_seconds']:.1f} s (the first step's batches through forward and "
              "backward once, before the steps)")
    first, *rest = result["step_seconds"]
    if not rest:
        print(f"smoke: one step, {first:.3f} s; a steady step needs --steps 2 or more")
        return result
    steady = statistics.median(rest)
    tokens = statistics.mean(result["tokens"][1:])
    work = statistics.mean(result["step_flops"][1:])
    print(f"smoke: first step {first:.3f} s, then {steady:.3f} s per step (median of {len(rest)}, {min(rest):.3f} to "
          f"{max(rest):.3f} s); the steps after the first waited {statistics.median(result['data_seconds'][1:]):.3f} s "
          f"each for their batches ({args.workers} DataLoader workers per rank)")
    peak, source = peak_tflops(args, device)
    rate = work / steady / 1e12
    utilisation = f"{100 * rate / peak:.1f}% of {peak:g} TFLOP/s ({source})" if peak else \
        "model FLOP utilisation unknown: pass --peak-tflops"
    print(f"smoke: {tokens / steady:,.0f} tokens/s ({tokens:,.0f} real tokens a step); {work / 1e12:.3f} model "
          f"TFLOPs a step (counted from the sizes), {rate:.3f} TFLOP/s: {utilisation}")
    if device.type == "cuda":
        peak_memory = f"{torch.cuda.max_memory_allocated(device) / 2**30:.2f} GiB (torch.cuda.max_memory_allocated " \
                      "while loading both models and running the stage)"
    else:
        peak_memory = f"{resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB (the process's peak " \
                      "resident set, ru_maxrss, building the checkpoints included: a CPU has no allocator statistics)"
    print(f"smoke: peak memory {peak_memory}")
    return {**result, "steady_step_seconds": steady, "tokens_per_second": tokens / steady, "tflop_per_second": rate,
            "utilisation": rate / peak if peak else None}


def peak_tflops(args: argparse.Namespace, device: torch.device) -> tuple[float | None, str | None]:
    """The device's peak TFLOP/s and where it comes from: --peak-tflops, else a known CUDA card's bfloat16
    figure (the precision distill.py trains in there) in configs/cards.json; (None, None) on a CPU."""
    if args.peak_tflops:
        return args.peak_tflops, "--peak-tflops"
    entry = flops.device_peak(device)
    return (entry[0]["tflops"], entry[1]) if entry else (None, None)


# ----------------------------------------------------------------------------------------------
# Command line


def default_workers() -> int:
    """DataLoader workers per rank: this machine's CPUs less one per rank (which runs the step), shared
    among the ranks torchrun starts here (LOCAL_WORLD_SIZE), at most 8."""
    return max(0, min(8, (os.cpu_count() or 1) // int(os.environ.get("LOCAL_WORLD_SIZE", "1")) - 1))


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The flags, checked: InputError for a value no stage can run with."""
    d = DistillConfig()
    p = argparse.ArgumentParser(prog="distill.py",
                                description="LinMU distillation, one stage per run: 1 trains Flex-MA alone, 2 adds "
                                            "Local-Swin, 3 fine-tunes the MLPs and connector through LoRA.",
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--stage", type=int, choices=[1, 2, 3], help="which distillation stage to run (required "
                                                                 "except with --smoke, which runs stage 1)")
    p.add_argument("--student", help=f"checkpoint the stage starts from (default: {DEFAULT_STUDENT} for stage 1, "
                                     "OUT/stage{N-1} after)")
    p.add_argument("--teacher", default=DEFAULT_TEACHER, help="the frozen teacher: Hub repo id or local directory")
    p.add_argument("--out", default=DEFAULT_OUT, help="stage N writes OUT/stageN")
    p.add_argument("--data", help="JSONL file of samples: {\"image\"|\"images\"|\"video\": ..., \"prompt\": ..., "
                                  "\"response\": optional}; default: a synthetic set generated in-process")
    p.add_argument("--synthetic-samples", type=int, default=48,
                   help="size of the synthetic set when --data is not given")
    p.add_argument("--eval-samples", type=int, default=4, help="samples held out for evaluation")
    p.add_argument("--steps", type=int, help=f"optimizer steps ({d.steps}; {SMOKE_STEPS} with --smoke)")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="samples per micro-batch (per rank)")
    p.add_argument("--grad-accum", type=int, default=d.grad_accum,
                   help="micro-batches per optimizer step (per rank): a step's global batch is --batch-size x "
                        "ranks x --grad-accum samples")
    p.add_argument("--workers", type=int, default=default_workers(),
                   help="DataLoader processes (per rank) that prepare batches while the step runs; 0: the training "
                        "process prepares each batch itself. The default leaves one of this machine's CPUs to each "
                        "rank's step and takes the others, at most 8 a rank")
    p.add_argument("--lr", type=float, default=None, help=f"peak learning rate (default per stage: {STAGE_LR})")
    p.add_argument("--warmup", type=int, default=d.warmup, help="linear warm-up steps before the cosine decay")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW weight decay on matrices")
    p.add_argument("--clip", type=float, default=d.clip, help="gradient-norm clipping")
    p.add_argument("--temperature", type=float, default=d.temperature, help="logit-distillation temperature")
    p.add_argument("--hidden-weight", type=float, default=d.hidden_weight, help="weight of the hidden-state loss")
    p.add_argument("--kl-weight", type=float, default=d.kl_weight, help="weight of the logit KL loss")
    p.add_argument("--hidden-target", choices=["layer", "stream"], default=d.hidden_target,
                   help="student layer inputs for the hidden loss: the teacher's (layer-local) or its own stream")
    p.add_argument("--branches", choices=["both", "flex", "swin"], default=None,
                   help="force M-MATE branches (ablations); default: flex in stage 1, both after")
    p.add_argument("--lora-rank", type=int, default=d.lora_rank, help="LoRA rank (stage 3)")
    p.add_argument("--lora-alpha", type=float, default=d.lora_alpha, help="LoRA alpha (stage 3)")
    p.add_argument("--eval-every", type=int, default=d.eval_every, help="evaluate every N steps (0: only at the end)")
    p.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps (0: only at the end)")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile the student's decoder layers (default: on for CUDA, off on CPU)")
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute layers in backward (long videos)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed for data order, synthetic data and LoRA init")
    p.add_argument("--device", default=default_device(), help="torch device")
    p.add_argument("--resume", action="store_true", help="continue OUT/stageN from its trainer.pt")
    p.add_argument("--smoke", action="store_true",
                   help="check that stage 1 runs on this machine at full size, with no download: build a teacher "
                        "with random weights of --config's sizes (a stand-in tokenizer) and its LinMU student in a "
                        "temporary directory, run --steps steps of stage 1 on them with the other flags as given, "
                        "and print the compilation's time, the steady step's, tokens/s, model FLOP utilisation and "
                        "the peak memory")
    p.add_argument("--config", default=str(SMOKE_CONFIG), help="--smoke: the teacher's config.json")
    p.add_argument("--peak-tflops", type=float, help="--smoke: the device's peak TFLOP/s, for the model FLOP "
                                                     "utilisation (default: a known CUDA card's, configs/cards.json)")
    args = p.parse_args(argv)
    if args.smoke:
        if (args.stage not in (None, 1) or args.student or args.resume or args.teacher != DEFAULT_TEACHER
                or args.out != DEFAULT_OUT):
            raise InputError("--smoke runs stage 1 on checkpoints it builds in a temporary directory: drop --stage, "
                             "--student, --teacher, --out and --resume")
        args.stage = 1
    elif args.stage is None:
        p.error("the following arguments are required: --stage (or --smoke)")
    args.steps = args.steps if args.steps is not None else SMOKE_STEPS if args.smoke else d.steps
    check_device(args.device)
    check_bounds(args, at_least={"steps": 1, "batch_size": 1, "grad_accum": 1, "workers": 0, "warmup": 0,
                                 "weight_decay": 0, "hidden_weight": 0, "kl_weight": 0, "lora_rank": 1, "eval_every": 0,
                                 "save_every": 0, "eval_samples": 1, "synthetic_samples": 1},
                 above={"lr": 0, "clip": 0, "temperature": 0, "peak_tflops": 0})
    return args


def stage_config(args: argparse.Namespace) -> DistillConfig:
    """The DistillConfig of the flags; --compile defaults to on for CUDA, off elsewhere."""
    return DistillConfig(**{k: getattr(args, k) for k in DistillConfig.__dataclass_fields__ if k != "compile"},
                         compile=args.compile if args.compile is not None else args.device.startswith("cuda"))


def run_stage(args: argparse.Namespace, count_work: bool = False) -> dict:
    """One stage as the flags say: the checkpoints' configs and the data are checked before any weight
    is loaded, then train_stage runs and writes OUT/stageN. Returns train_stage's result, and with
    count_work its "step_flops", each step's model FLOPs (step_flops over its global batch, counted
    afterwards from the same batches prepared again on the host: no step waits for it)."""
    from processing import Processor

    cfg = stage_config(args)
    torch.manual_seed(cfg.seed)
    random.seed(cfg.seed)
    init = Path(args.student or (DEFAULT_STUDENT if cfg.stage == 1 else Path(args.out) / f"stage{cfg.stage - 1}"))
    if not (init / "config.json").is_file():
        make = "python convert.py" if cfg.stage == 1 else f"python distill.py --stage {cfg.stage - 1} --out {args.out}"
        raise FileNotFoundError(f"no student checkpoint at {init}: create it with `{make}` (or pass --student)")
    teacher_path = resolve_checkpoint(args.teacher)
    if check_checkpoint(init, expect="student").text != check_checkpoint(teacher_path, expect="teacher").text:
        raise InputError(f"the teacher {args.teacher} has other decoder sizes than the student {init}: "
                         "pass the --teacher it was converted from")
    processor = Processor.from_pretrained(init)
    if args.data:
        samples = read_jsonl(args.data)
    else:
        samples = synthetic_samples(args.synthetic_samples, cfg.seed)
        tqdm.write(f"no --data given: distilling on {len(samples)} synthetic samples generated in-process "
                   "(procedural images and videos; pass --data for real ones)")
    if len(samples) <= args.eval_samples:
        raise InputError(f"{len(samples)} samples cannot spare {args.eval_samples} for evaluation: "
                         "give more samples or lower --eval-samples")
    tuning = tuning_for(torch.device(args.device))
    student = tune(load_model(init, args.device), replace(tuning, fused=False))  # it trains: no fused copies
    teacher = tune(load_model(teacher_path, args.device), tuning).requires_grad_(False)
    check_shared_vision(student, teacher)
    held_out = SampleBatches(samples[:args.eval_samples], processor, cfg.batch_size, cfg.seed, args.device,
                             shuffle=False)
    batches = SampleBatches(samples[args.eval_samples:], processor, cfg.batch_size, cfg.seed, args.device,
                            workers=args.workers, stride=rank_and_world()[1])
    result = train_stage(student, teacher, batches, [held_out(i) for i in range(len(held_out))], cfg,
                         out_dir=Path(args.out) / f"stage{cfg.stage}", source=init, resume=args.resume)
    if count_work:
        rank, world = rank_and_world()
        steps = range(cfg.steps - len(result["losses"]), cfg.steps)
        work = [sum(step_flops(teacher.config, student.config, batches.dataset[i], cfg, tuning)
                    for i in micro_batch_indices(step, cfg, rank, world)) for step in steps]
        result["step_flops"] = sum_over_ranks(torch.tensor(work, dtype=torch.float64, device=args.device)).tolist()
    return result


@contextlib.contextmanager
def torchrun_group(args: argparse.Namespace):
    """Under torchrun (its WORLD_SIZE in the environment): this rank's device in args.device (cuda:LOCAL_RANK
    on CUDA) and, for the run's duration, a process group, NCCL on CUDA and gloo on a CPU. Without torchrun,
    nothing: one process."""
    if "WORLD_SIZE" not in os.environ:
        yield
        return
    device = torch.device(args.device)
    if device.type not in ("cuda", "cpu"):
        raise InputError(f"--device {args.device}: under torchrun, distill.py runs on CUDA (NCCL) or a CPU (gloo)")
    if device.type == "cuda":
        if device.index is not None:
            raise InputError(f"--device {args.device}: under torchrun each rank takes the GPU of its LOCAL_RANK; "
                             "pass --device cuda")
        device = check_device(f"cuda:{os.environ['LOCAL_RANK']}")
        torch.cuda.set_device(device)
        args.device = str(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                            device_id=device if device.type == "cuda" else None)
    try:
        yield
    finally:
        dist.destroy_process_group()


def main(argv: list[str] | None = None) -> dict:
    """Run the stage the flags name (or the --smoke check) and return its result (train_stage's).

    Under torchrun, ranks other than 0 print nothing: rank 0 speaks for the run, its one error line
    included (the ranks meet the same errors, see stop_together, and all exit with status 2). A bug's
    traceback still shows on every rank.
    """
    with contextlib.ExitStack() as silence:
        if int(os.environ.get("RANK", "0")) > 0:  # torchrun's rank
            devnull = silence.enter_context(open(os.devnull, "w"))
            silence.enter_context(contextlib.redirect_stdout(devnull))
            silence.enter_context(contextlib.redirect_stderr(devnull))
        return run_command(argv)


@user_errors("distill.py", DivergenceError)
def run_command(argv: list[str] | None) -> dict:
    """main's work, under the one-line error convention (user_errors)."""
    args = parse_args(argv)
    with torchrun_group(args):
        if args.smoke:
            return smoke(args)
        result = run_stage(args)
        print(f"stage {args.stage} done: held-out hidden cosine {result['cosine']:.4f}, KL {result['kl']:.4f}, "
              f"top-1 agreement {result['top1']:.3f}; student written to {Path(args.out) / f'stage{args.stage}'}")
        if args.stage < 3:
            teacher_flag = "" if args.teacher == DEFAULT_TEACHER else f" --teacher {args.teacher}"
            print(f"next: python distill.py --stage {args.stage + 1} --out {args.out}{teacher_flag}")
        return result


if __name__ == "__main__":
    main()
