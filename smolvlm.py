"""SmolVLM2 in our own modules: the teacher, and the model a LinMU student lives in.

SmolVLM2 (Hugging Face's SmolVLM / Idefics3 family): a SigLIP vision encoder turns each 512x512
frame into 32x32 patch features, a pixel-shuffle connector folds every s x s block of them into
one token of the Llama-style SmolLM2 decoder. Parameter names mirror the Hub checkpoint keys, so a
checkpoint loads with no key mapping. A LinMU student is the same model whose decoder layers hold
M-MATE mixers (linmu.py) instead of attention: `convert_to_linmu`.

Here too: checkpoint loading and saving (Hub layout: config.json + safetensors), and the decoding
step with fixed-size caches written in place (VLM.step). generate.py generates with it; speed.py
makes it fast.
"""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from torch import Tensor, nn

from cli import InputError
from linmu import (MMATE, AttentionProjections, Chunking, KVCache, MixerConfig, PromptPlan, RMSNorm, TokenLayout,
                   cached_attention, convert_layers)

# ----------------------------------------------------------------------------------------------
# Configuration

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
    """A checkpoint's "linmu" entry. A "chunk_size" in it is not read: the scan's chunking is not a
    property of the model (linmu.Chunking). Without "rotary_scan", the student scans the prompt's
    own order, as a student trained without Rotary Major-Scan does."""
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
        """One new token per sequence, at its own position ((B,) long): x (B, 1, D) -> (B, 1, D), its key
        and value written in place at slot = position. The slots past a sequence's position hold its
        padding, or nothing yet: masked, then overwritten as it decodes."""
        q, k, v = self.qkv(x, *rope)
        cache.write(position, k, v)
        visible = torch.arange(cache.k.shape[2], device=x.device) <= position[:, None]  # (B, slots) written so far
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
        y, cache = self.self_attn(self.input_layernorm(h), plan)
        return self._feed_forward(h, y), cache

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
    activations (for long videos in training; set by distill.py). chunking: how Flex-MA's scans are
    cut (linmu.Chunking; speed.tune sets the device's).
    """

    def __init__(self, cfg: TextConfig, linmu: MixerConfig | None = None):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, linmu) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.mixer = linmu
        self.gradient_checkpointing = False
        self.chunking = Chunking()

    def plan(self, layout: TokenLayout, dtype: torch.dtype, new_tokens: int = 0) -> list[PromptPlan]:
        """Everything the layers need from the prompt's layout, computed once before them: a plan per layer."""
        rope = tuple(t.to(dtype) for t in self.rotary(layout.positions))
        return PromptPlan.build(layout, rope, self.mixer, len(self.layers), new_tokens, self.chunking)

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
        """One new token per sequence, each at its own position ((B,) long): h (B, 1, D) -> final-normed
        (B, 1, D). Fixed shapes and no host synchronisation; the caches are updated in place."""
        rope = tuple(t.to(h.dtype) for t in self.rotary(position[:, None]))  # (B, 1, Dh) each
        for layer, cache in zip(self.layers, caches):
            h = layer.step(h, rope, position, cache)
        return self.norm(h)


# ----------------------------------------------------------------------------------------------
# The whole model


@dataclass
class VLMOutput:
    """logits: (B, L, V); caches: one decoding cache per decoder layer; hidden_states: see TextModel.forward;
    vision_states: the vision encoder's output the prompt's images gave (VLM.vision_states), None without images."""

    logits: Tensor
    caches: list
    hidden_states: list[Tensor] | None = None
    vision_states: Tensor | None = None


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

    def vision_states(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None) -> Tensor:
        """The vision encoder's output: pixel_values (B, N, C, H, W) or (N, C, H, W), pixel_attention_mask the same
        without C, True on real pixels -> (n_real_images, patches, Dv); all-zero images (batch padding) are dropped."""
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
        return self.model.vision_model(images, patch_mask)

    def encode_images(self, pixel_values: Tensor, pixel_attention_mask: Tensor | None = None) -> Tensor:
        """The images as the decoder reads them, the connector's output: (n_real_images, image_seq_len, D)."""
        return self.model.connector(self.vision_states(pixel_values, pixel_attention_mask))

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
                output_hidden_states: bool = False, attention_mask: Tensor | None = None,
                vision_states: Tensor | None = None) -> VLMOutput:
        """A whole prompt, input_ids (B, L) -> logits (B, L, V) and decoding caches with room for new_tokens more.

        attention_mask (B, L): 1 on real tokens, 0 on right padding (processing.Processor.collate's),
        None for none. Padding changes no real token's logits, and the caches hold each sequence as
        it ends: decoding continues sequence b at position attention_mask[b].sum() (VLM.step).
        vision_states: the vision encoder's output on the images (vision_states()) in place of
        pixel_values, for a caller that has it already: distill.py computes it once for the teacher
        and the student, whose encoders are the same frozen weights. The output returns the one used."""
        if vision_states is None and pixel_values is not None:
            vision_states = self.vision_states(pixel_values, pixel_attention_mask)
        h = self.embed(input_ids, self.model.connector(vision_states) if vision_states is not None else None)
        grids = grids if grids is not None else self.default_grids(input_ids)
        layout = TokenLayout.build(input_ids, self.config.image_token_id, grids, attention_mask)
        h, caches, hidden_states = self.model.text_model(h, layout, new_tokens, output_hidden_states)
        return VLMOutput(self.lm_head(h), caches, hidden_states, vision_states)

    @torch.no_grad()  # else the caches, written from trainable weights, would join the autograd graph
    def step(self, token: Tensor, position: Tensor, caches: list) -> Tensor:
        """One decoding step: text tokens (B,), each at its own sequence's `position` ((B,) long) ->
        next-token logits (B, V). The caches, from forward(..., new_tokens=N), are updated in place;
        the shapes are fixed and nothing waits on the host, so a step can be recorded as a CUDA
        graph (speed.decoder)."""
        if position.shape != token.shape:
            raise ValueError(f"position {list(position.shape)} must be one per sequence, as token {list(token.shape)}")
        h = self.model.text_model.embed_tokens(token[:, None])  # (B, 1, D)
        return self.lm_head(self.model.text_model.step(h, position, caches))[:, 0]


def convert_to_linmu(teacher: VLM, mixer: MixerConfig | None = None) -> VLM:
    """The LinMU student of a teacher: a copy whose every decoder self-attention is replaced by an
    M-MATE layer initialized from it (linmu.convert_layers); the vision encoder, connector, MLPs,
    norms, embeddings and head are the teacher's."""
    mixer = mixer or MixerConfig()
    student = copy.deepcopy(teacher)
    student.config = replace(teacher.config, linmu=mixer)
    text = teacher.config.text
    student.model.text_model.mixer = mixer
    convert_layers(student.model.text_model.layers, text.hidden_size, mixer, text.rms_norm_eps)
    return student


# ----------------------------------------------------------------------------------------------
# Loading and saving Hub-layout checkpoints (config.json + safetensors)


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


