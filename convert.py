"""Convert a SmolVLM2 checkpoint into a LinMU student, both M-MATE branches initialized from attention.

    python convert.py --model HuggingFaceTB/SmolVLM2-256M-Video-Instruct --out checkpoints/linmu-smolvlm2-256m

Downloads the checkpoint (or reads a local directory), loads the teacher, replaces every decoder
self-attention by an M-MATE layer initialized from its q/k/v/o weights (linmu.MMATE.from_attention),
and writes the student (config.json with a "linmu" entry, model.safetensors, the tokenizer and
processor files) where distill.py, bench.py and `python generate.py --model` read it.
"""

from __future__ import annotations

import argparse
from dataclasses import fields

import torch

from cli import check_bounds, user_errors
from linmu import MixerConfig
from smolvlm import check_checkpoint, convert_to_linmu, load_model, resolve_checkpoint, save_model

DEFAULT_TEACHER = "HuggingFaceTB/SmolVLM2-256M-Video-Instruct"
DEFAULT_STUDENT = "checkpoints/linmu-smolvlm2-256m"

MIXER_HELP = {
    "conv_kernel": "Flex-MA's causal convolution width",
    "window_frames": "Local-Swin window over video frames",
    "window_rows": "Local-Swin window over token rows",
    "window_cols": "Local-Swin window over token columns",
    "text_window": "tokens a text token attends to (itself included)",
    "branches": "M-MATE branches: both, flex or swin",
    "rotary_scan": "Rotary Major-Scan: Flex-MA reads each visual grid in a major order that rotates from layer "
                   "to layer (--no-rotary-scan: the prompt's own order in every layer)",
    "dt_max": "Flex-MA's initial step sizes, log-spaced over the heads from 1e-3 to this",
    "A_max": "Flex-MA's initial decay rates, spread over the heads from 1 to this",
}
BRANCHES = ["both", "flex", "swin"]


@user_errors("convert.py")
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="convert.py",
                                     description="Convert a SmolVLM2 teacher into a LinMU student whose decoder "
                                                 "self-attention layers are M-MATE layers initialized from them.")
    parser.add_argument("--model", default=DEFAULT_TEACHER,
                        help="teacher: Hub repo id or local checkpoint directory (default: %(default)s)")
    parser.add_argument("--out", default=DEFAULT_STUDENT,
                        help="output directory for the student (default: %(default)s)")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                        help="dtype of the written weights (default: %(default)s)")
    for field in fields(MixerConfig):
        flag, help = f"--{field.name.replace('_', '-')}", f"{MIXER_HELP[field.name]} (default: %(default)s)"
        if isinstance(field.default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=field.default, help=help)
        else:
            parser.add_argument(flag, type=type(field.default), default=field.default, help=help,
                                choices=BRANCHES if field.name == "branches" else None)
    args = parser.parse_args(argv)
    check_bounds(args, at_least={f.name: 1 for f in fields(MixerConfig) if type(f.default) is int},
                 above={f.name: 0 for f in fields(MixerConfig) if type(f.default) is float})

    source = resolve_checkpoint(args.model)
    check_checkpoint(source, expect="teacher")
    teacher = load_model(source, "cpu", getattr(torch, args.dtype))
    mixer = MixerConfig(**{f.name: getattr(args, f.name) for f in fields(MixerConfig)})
    student = convert_to_linmu(teacher, mixer)
    out = save_model(student, args.out, source=source)
    count = lambda m: sum(p.numel() for p in m.parameters()) / 1e6
    print(f"teacher {args.model}: {count(teacher):.1f}M parameters -> LinMU student: {count(student):.1f}M "
          f"parameters, {len(student.model.text_model.layers)} M-MATE layers, written to {out}")
    print(f"next: python distill.py --stage 1 --student {out} --teacher {args.model}")


if __name__ == "__main__":
    main()
