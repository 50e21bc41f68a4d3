"""The work of the models counted from their sizes and a prompt's layout, and the peak rates of known cards
it is measured against: bench.py's limits and distill.py's model FLOP utilisation.

The counts are matrix products in FLOPs, 2 per multiply-add, as torch.utils.flop_counter.FlopCounterMode
counts them (the tests check them against it, part by part), and no elementwise work (norms, softmax,
activations, decays), with one exception named below: Flex-MA's depthwise convolution.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from pathlib import Path

import torch
from torch import Tensor

from linmu import TEXT_BLOCK, MixerConfig, layer_pattern
from smolvlm import VLMConfig
from speed import Tuning, pieces

CARDS = Path(__file__).parent / "configs" / "cards.json"  # peak TFLOP/s and GB/s of known cards


def decoder_flops(config: VLMConfig, layers: int, visual: Tensor, grids: list[tuple[int, int, int]],
                  settings: Tuning, head_tokens: int) -> dict[str, int]:
    """One sequence through `layers` decoder layers and the head at its last `head_tokens` tokens, by part:
    attention, mlp and head for the teacher; flex, flex conv, swin, gate, mlp and head for the student
    (config.linmu set; its branches), whose layers run with these Tuning settings. visual: (L,) bool, the
    sequence's visual tokens, which fill `grids` (frames, rows, cols) in order.

    Attention counts the (query, key) pairs its kernel computes: the causal half of the prompt's for the
    teacher; for Local-Swin every pair of a window, windows padded to the largest and text blocks with all
    their keys (a mask does not skip work). Flex-MA's scan counts the chunked SSD algorithm's matmuls as they
    run (linmu.ssd_scan): in Tuning.piece_tokens pieces, chunks of Tuning.chunking.chunk_size, at least two
    and padded, and step 3 in blocks of its chunks_per_block; both directions where the prompt has visual
    tokens. One part FlopCounterMode does not see: "flex conv", Flex-MA's depthwise convolution (K
    multiply-adds a channel), which linmu writes as elementwise multiply-adds.
    """
    text, mixer = config.text, config.linmu
    D, H, kv, Dh = text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim
    L = len(visual)
    linear = lambda inputs, outputs: 2 * L * inputs * outputs  # one projection of every token
    qkvo = linear(D, (H + 2 * kv) * Dh) + linear(H * Dh, D)
    parts = {"mlp": layers * 3 * linear(D, text.intermediate_size), "head": 2 * head_tokens * D * text.vocab_size}
    if mixer is None:
        return {"attention": layers * (qkvo + 4 * H * Dh * L * (L + 1) // 2), **parts}
    flex, swin = mixer.branches != "swin", mixer.branches != "flex"
    if flex:
        directions, conv_dim = 2 if visual.any() else 1, 3 * H * Dh  # conv channels: x, B and C
        scan = directions * scan_flops(L, H, Dh, settings)
        parts["flex"] = layers * (linear(D, H * Dh + conv_dim + H) + linear(H * Dh, D) + scan)
        parts["flex conv"] = layers * directions * 2 * mixer.conv_kernel * conv_dim * L
    if swin:
        parts["swin"] = sum(qkvo + 4 * H * Dh * window_pairs(visual, grids, mixer, layer_pattern(i)["shifted"])
                            for i in range(layers))
    if flex and swin:
        parts["gate"] = layers * linear(D, 1)
    return parts


def scan_flops(length: int, heads: int, head_dim: int, settings: Tuning) -> int:
    """linmu.ssd_scan's matmul FLOPs over one direction of a prompt (batch 1, state size N = head dim P), a piece at a
    time: per chunk of Q tokens, step 1's C B^T and its scores times x (2 Q^2 (N + P)), steps 2 and 4 (2 Q P N each);
    step 3 a (R + 1) x R matmul a block of R chunks and one across the blocks."""
    Q, R, P = settings.chunking.chunk_size, settings.chunking.chunks_per_block, head_dim
    total = 0
    for piece in pieces(length, settings.piece_tokens) if settings.piece_tokens else [slice(0, length)]:
        chunks = max(2, (piece.stop - piece.start) // Q + 1)
        blocks = max(2, chunks // R + 1)
        total += chunks * (4 * Q * Q * P + 4 * Q * P * P) + (blocks * 2 * (R + 1) * R + 2 * (blocks + 1) ** 2) * P * P
    return heads * total


def window_pairs(visual: Tensor, grids: list[tuple[int, int, int]], mixer: MixerConfig, shifted: bool) -> int:
    """The (query, key) pairs one Local-Swin layer computes for a prompt (linmu.text_windows, linmu.swin_windows):
    blocks of TEXT_BLOCK queries (at most text_window) holding a text token, each with all its keys; and the
    Swin windows of every grid, each padded to the largest."""
    pairs = 0
    if not visual.all():
        block = min(TEXT_BLOCK, mixer.text_window)
        blocks = len(torch.unique((~visual).nonzero() // block))
        pairs += blocks * block * (block + mixer.text_window - 1)
    if visual.any():
        window = (mixer.window_frames, mixer.window_rows, mixer.window_cols)
        axes = [[window_sizes(n, w, shifted) for n, w in zip(grid, window)] for grid in grids]
        count = sum(math.prod(len(sizes) for sizes in grid) for grid in axes)
        largest = max(math.prod(max(sizes) for sizes in grid) for grid in axes)
        pairs += count * largest**2
    return pairs


def window_sizes(length: int, window: int, shifted: bool) -> list[int]:
    """The sizes of the Swin windows along one grid axis: w = min(window, length), and shifted windows start
    half a window in where the axis is longer than w (linmu.swin_windows)."""
    w = min(window, length)
    offset = w - w // 2 if shifted and length > w else 0
    return list(Counter((cell + offset) // w for cell in range(length)).values())


def vision_flops(config: VLMConfig, images: int) -> dict[str, int]:
    """`images` images (tiles or frames) through the vision encoder, every patch of each valid, and through
    the connector, by part: "vision" (the patch embedding and the encoder layers, all-pairs attention) and
    "connector" (its projection of the pixel-shuffled patches)."""
    v = config.vision
    n, D, layers = (v.image_size // v.patch_size) ** 2, v.hidden_size, v.num_hidden_layers  # n patches an image
    embedding = 2 * n * v.num_channels * v.patch_size**2 * D
    layer = 2 * n * 4 * D * D + 4 * n * n * D + 2 * n * 2 * D * v.intermediate_size  # q/k/v/out, attention, MLP
    return {"vision": images * (embedding + layers * layer),
            "connector": images * 2 * n * D * config.text.hidden_size}  # n / s^2 tokens of s^2 D features


def device_peak(device: torch.device) -> tuple[dict, str] | None:
    """A CUDA device's entry in configs/cards.json, (figures, where they come from); None on a CPU or for a
    card the table does not know."""
    entry = card_peak(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return (entry[1], f"{CARDS.parent.name}/{CARDS.name}: {entry[0]}") if entry else None


def card_peak(name: str) -> tuple[str, dict] | None:
    """The entry of configs/cards.json for a device name, (card, figures): the longest card name that occurs in it
    as whole words; None for a card the table does not know."""
    cards = json.loads(CARDS.read_text())["cards"]
    found = [card for card in cards if re.search(rf"\b{re.escape(card)}\b", name)]
    if not found:
        return None
    card = max(found, key=len)
    return card, cards[card]
