"""Answer about images or a video with a SmolVLM2 teacher or its LinMU student:

    python generate.py --model checkpoints/linmu-smolvlm2-256m --image cat.jpg --prompt "What is this?"
    python generate.py --model HuggingFaceTB/SmolVLM2-256M-Video-Instruct --video frames/ --max-frames 256

generate() reads the prompt once (prefill), then takes one cheap step per new token on the
model's fixed-size caches: the teacher's KV cache, the student's Flex-MA state and Local-Swin ring.
"""

from __future__ import annotations

import argparse

import torch
from torch import Tensor

from cli import InputError, check_bounds, check_device, default_device, user_errors
from processing import Processor, load_video
from smolvlm import VLM, load_model, resolve_checkpoint
from speed import decoder, tune, tuning_for


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


@torch.no_grad()
def generate(model: VLM, input_ids: Tensor, pixel_values: Tensor | None = None,
             pixel_attention_mask: Tensor | None = None, grids: list | None = None, max_new_tokens: int = 64,
             temperature: float = 0.0, top_p: float = 1.0, eos_token_id: int | None = None,
             generator: torch.Generator | None = None, attention_mask: Tensor | None = None) -> Tensor:
    """Continue a batch of prompts -> new token ids (B, <= max_new_tokens).

    Prompts of different lengths come right-padded, with attention_mask (B, L) 0 on the padding (as
    processing.Processor.collate batches them); each sequence continues from its own end, and gets
    the tokens it would get alone. The prompt, images and video included, is read once (prefill);
    each new token is then one step on the caches (a CUDA graph on CUDA): the teacher's KV cache,
    allocated for the prompt and the new tokens, the LinMU student's Flex-MA state and Local-Swin
    ring, whose size does not depend on the context. Sequences that produced eos_token_id keep
    producing it until all have.
    """
    out = model(input_ids, pixel_values, pixel_attention_mask, grids, new_tokens=max_new_tokens,
                attention_mask=attention_mask)
    step = decoder(model, out.caches)
    batch, length = input_ids.shape
    position = (attention_mask.sum(1) if attention_mask is not None  # (B,) each sequence's next position
                else torch.full((batch,), length, device=input_ids.device))
    logits = out.logits[torch.arange(batch, device=input_ids.device), position - 1]  # (B, V) at each one's end
    finished = torch.zeros(batch, dtype=torch.bool, device=input_ids.device)
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
# Command line: describe an image or a video with a teacher or a LinMU student checkpoint


@user_errors("generate.py")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="generate.py",
        description="Generate an answer about images or a video with a SmolVLM2 teacher or its LinMU student "
                    "(any checkpoint load_model reads: a Hub repo id, convert.py's output, distill.py's output).")
    parser.add_argument("--model", required=True, help="checkpoint directory or Hub repo id (owner/name)")
    parser.add_argument("--image", action="append", default=[], help="an image file; repeat for several images")
    parser.add_argument("--video",
                        help="a video: a folder of frame images (one per second) or a file (needs torchcodec)")
    parser.add_argument("--prompt", default="Describe this.",
                        help="the question or instruction (default: %(default)s)")
    parser.add_argument("--max-frames", type=int, default=64,
                        help="most video frames sampled at 1 fps; LinMU's point is that more is affordable "
                             "(default: %(default)s)")
    parser.add_argument("--max-new-tokens", type=int, default=128,
                        help="longest answer in tokens (default: %(default)s)")
    parser.add_argument("--temperature", type=float, default=0.0, help="0 is greedy decoding (default: %(default)s)")
    parser.add_argument("--top-p", type=float, default=1.0,
                        help="nucleus sampling mass when temperature > 0 (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="sampling seed (default: %(default)s)")
    parser.add_argument("--device", default=default_device(), help="torch device (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default=None,
                        help="weights' dtype (default: bfloat16 on CUDA, float32 on CPU)")
    args = parser.parse_args(argv)
    check_device(args.device)
    check_bounds(args, at_least={"max_frames": 1, "max_new_tokens": 1, "temperature": 0}, above={"top_p": 0})
    if args.top_p > 1:
        raise InputError(f"--top-p must be at most 1, not {args.top_p}")

    path = resolve_checkpoint(args.model)
    processor = Processor.from_pretrained(path)  # the inputs first: a mistake there costs no weight loading
    content = [{"type": "image"} for _ in args.image] + ([{"type": "video"}] if args.video else [])
    messages = [{"role": "user", "content": content + [{"type": "text", "text": args.prompt}]}]
    video = load_video(args.video, fps=1.0, max_frames=args.max_frames) if args.video else None
    batch = processor(messages, images=args.image, video=video)
    dtype = getattr(torch, args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32"))
    model = load_model(path, args.device, dtype)
    tune(model, tuning_for(torch.device(args.device)))
    pixels = batch["pixel_values"].to(args.device) if len(batch["pixel_values"]) else None
    ids = generate(model, batch["input_ids"].to(args.device), pixels, grids=batch["grids"],
                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                   eos_token_id=processor.eos_token_id,
                   generator=torch.Generator(args.device).manual_seed(args.seed),
                   attention_mask=batch["attention_mask"].to(args.device))
    print(processor.decode(ids[0]).strip())


if __name__ == "__main__":
    main()
