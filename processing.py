"""SmolVLM2 input preparation in plain torch/torchvision and `tokenizers`.

This turns a chat (or a prompt string), images and a video into what the SmolVLM2 teacher and
the LinMU student read, exactly as Hugging Face's SmolVLMProcessor does for a Hub checkpoint:

  1. images: resize so the longest edge is `longest_edge` (2048), resize again so both sides are
     multiples of the tile size (512), cut into rows x cols tiles and add the whole image squashed
     to one tile (the "global" image); rescale to [0, 1] and normalize with mean = std = 0.5;
  2. video: sample frames at `fps` (at most `max_frames`), resize each frame like an unsplit image
     (longest edge, then squashed to one tile);
  3. prompt: the chat template, then every `<image>` / `<video>` placeholder expanded into the
     token string the model was trained on (each tile or frame is `image_seq_len` `<image>`
     tokens, 64 for the 256M model: 512 px / 16 px patches = 32 x 32, pixel-shuffled by 4 to 8 x 8);
  4. `grids`: per sample, the (frames, rows, cols) shape of each visual grid in the order its tokens
     appear (a tile or the global image is (1, 8, 8), a video one (T, 8, 8) grid) - the layout
     `linmu.TokenLayout.build` needs to place visual tokens in space and time.

All resizing is torchvision's LANCZOS on uint8 tensors, what transformers' default (torchvision
backed) SmolVLMImageProcessor and SmolVLMVideoProcessor run: pixel values and input_ids match them
exactly (tested). transformers' PIL-backed SmolVLMImageProcessorPil resamples with PIL's LANCZOS,
which differs by up to 3/255 on a pixel (mean absolute difference about 1e-4 after normalizing).
torchvision before 0.27 cannot resize tensors with LANCZOS; there `resize` goes through PIL, one
side at a time as torch does, within 2 grey levels of torchvision per resize and 3 after the two
or three resizes in a row an image goes through (tested against torchvision and transformers).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import NamedTuple

import PIL.Image
import PIL.ImageOps
import torch
import torchvision
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
from torch import Tensor
from torchvision.transforms.v2 import functional as TF

from cli import InputError

# The special tokens SmolVLM's prompt format is written in (fixed by the checkpoint's tokenizer).
IMAGE_TOKEN = "<image>"
VIDEO_TOKEN = "<video>"  # a placeholder in the text only, replaced before tokenizing
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
END_OF_UTTERANCE = "<end_of_utterance>"

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

# The PIL resampling codes a preprocessor_config.json stores, as torchvision interpolation modes.
RESAMPLE = {0: TF.InterpolationMode.NEAREST, 1: TF.InterpolationMode.LANCZOS,
            2: TF.InterpolationMode.BILINEAR, 3: TF.InterpolationMode.BICUBIC}

# torchvision resizes tensors with LANCZOS from 0.27 on (through torch's interpolate); before, PIL does.
TENSOR_LANCZOS = tuple(int(part) for part in torchvision.__version__.split(".")[:2]) >= (0, 27)


# ----------------------------------------------------------------------------------------------
# Loading images and videos


def load_image(path: str | Path) -> Tensor:
    """Read an image file as a uint8 RGB tensor (3, H, W).

    Decoded with PIL, turned upright by its EXIF orientation and converted to RGB, as transformers'
    load_image does, so the teacher sees the same pixels (torchvision.io's decoders are deprecated).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image file not found: {path}")
    try:
        with PIL.Image.open(path) as image:
            return TF.pil_to_tensor(PIL.ImageOps.exif_transpose(image).convert("RGB"))
    except OSError as error:  # not an image (PIL.UnidentifiedImageError), or a truncated one
        raise InputError(f"cannot decode image {path}: {error}") from None


class Video(NamedTuple):
    """Sampled video frames: frames uint8 (T, 3, H, W), the time of each frame and the clip's length.

    The prompt states the duration (whole seconds) and each frame's timestamp (MM:SS).
    """

    frames: Tensor
    timestamps: list[float]
    duration: float


def sample_frame_indices(total_frames: int, source_fps: float, duration: float,
                         fps: float, max_frames: int) -> list[int]:
    """SmolVLM2's frame sampling: `fps` frames per second, at most `max_frames`, evenly spread.

    When the clip is long enough (longer than max_frames / fps seconds plus two), sampling starts one
    second in and ends at frame total_frames - source_fps (for a whole-number fps, the last frame).
    The arithmetic follows transformers' SmolVLMVideoProcessor.sample_frames (numpy.linspace, then
    truncation, then duplicates dropped) so that the same frames are picked.
    """
    wanted = max(1, min(int(round(fps * duration)), max_frames))
    first, last = 0, total_frames - 1
    if duration - 2 > max_frames * fps:
        first, last = int(source_fps), min(int(total_frames - source_fps), total_frames - 1)
    if first >= last:
        first, last = 0, total_frames - 1
    if wanted == 1:
        return [first]
    step = (last - first) / (wanted - 1)
    points = [first + i * step for i in range(wanted - 1)] + [last]
    return sorted({int(p) for p in points})


def load_video(path: str | Path, fps: float = 1.0, max_frames: int = 64, folder_fps: float = 1.0) -> Video:
    """Sample a video at `fps` frames per second, at most `max_frames` frames (raise it for long videos).

    `path` is either a video file, decoded with torchcodec (pip install torchcodec), or a folder of
    frame images (.jpg, .jpeg, .png, .webp) read in file-name order, all the same size, taken
    `folder_fps` frames per second (default one per second: frame k is at k / folder_fps seconds).
    """
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not files:
            raise FileNotFoundError(f"no frame images ({', '.join(IMAGE_SUFFIXES)}) in folder {path}")
        duration = len(files) / folder_fps
        indices = sample_frame_indices(len(files), folder_fps, duration, fps, max_frames)
        frames = [load_image(files[i]) for i in indices]
        if len({f.shape for f in frames}) > 1:
            raise InputError(f"the frames in {path} differ in size: resize them to one size first")
        return Video(torch.stack(frames), [i / folder_fps for i in indices], duration)
    if not path.is_file():
        raise FileNotFoundError(f"video not found: {path}")
    try:
        from torchcodec.decoders import VideoDecoder
    except ImportError:
        raise InputError(f"reading the video file {path} needs torchcodec: pip install torchcodec, "
                         "or pass a folder of frame images instead") from None
    decoder = VideoDecoder(str(path))
    meta = decoder.metadata
    indices = sample_frame_indices(meta.num_frames, meta.average_fps, meta.duration_seconds, fps, max_frames)
    frames = decoder.get_frames_at(indices=indices).data
    return Video(frames, [i / meta.average_fps for i in indices], meta.duration_seconds)


# ----------------------------------------------------------------------------------------------
# Pixels


@dataclass
class ProcessorConfig:
    """Everything the SmolVLM2 processor reads from a checkpoint; the defaults are SmolVLM2-256M's.

    image_seq_len: <image> tokens per tile or frame (processor_config.json);
    longest_edge: images are first resized so their longest edge is this (preprocessor "size");
    tile_size: side of a tile and of the global image (preprocessor "max_image_size");
    do_image_splitting: cut images into tiles (else each image is one squashed tile);
    resample: PIL resampling code (1 = LANCZOS); image_mean, image_std, rescale_factor: normalization;
    video_longest_edge: frames are resized to this longest edge, then squashed to one tile. As in
        transformers, a config's "size" overrides "video_sampling.video_size" for videos;
    video_fps, video_max_frames: default frame sampling ("video_sampling");
    eos_token, pad_token: from tokenizer_config.json.
    """

    image_seq_len: int = 64
    longest_edge: int = 2048
    tile_size: int = 512
    do_image_splitting: bool = True
    resample: int = 1
    image_mean: tuple[float, ...] = (0.5, 0.5, 0.5)
    image_std: tuple[float, ...] = (0.5, 0.5, 0.5)
    rescale_factor: float = 1 / 255
    video_longest_edge: int = 2048
    video_fps: float = 1.0
    video_max_frames: int = 64
    eos_token: str = END_OF_UTTERANCE
    pad_token: str = "<|im_end|>"


def resize(pixels: Tensor, height: int, width: int, resample: int) -> Tensor:
    """Resize uint8 (..., 3, H, W) pixels with antialiasing; the result is rounded back to uint8.

    torchvision's resize, or PIL's for LANCZOS where torchvision cannot (TENSOR_LANCZOS is False).
    """
    if RESAMPLE[resample] == TF.InterpolationMode.LANCZOS and not TENSOR_LANCZOS:
        return pil_lanczos(pixels, height, width)
    return TF.resize(pixels, [height, width], interpolation=RESAMPLE[resample], antialias=True)


def pil_lanczos(pixels: Tensor, height: int, width: int) -> Tensor:
    """PIL's LANCZOS resize of uint8 (..., 3, H, W) pixels, one image at a time.

    The width first, then the height: the order torch resamples in. That keeps the result within 2
    grey levels of torchvision's (PIL's and torch's filter weights are rounded differently); a single
    PIL resize of both sides can differ by 40 where one side shrinks and the other grows.
    """
    images = []
    for image in pixels.reshape(-1, *pixels.shape[-3:]):
        pil = TF.to_pil_image(image)
        pil = pil.resize((width, pil.height), PIL.Image.Resampling.LANCZOS)
        images.append(TF.pil_to_tensor(pil.resize((width, height), PIL.Image.Resampling.LANCZOS)))
    return torch.stack(images).reshape(*pixels.shape[:-2], height, width)


def longest_edge_size(height: int, width: int, longest_edge: int) -> tuple[int, int]:
    """Output size with the longest edge set to `longest_edge`, aspect kept, the other edge made even."""
    aspect = width / height
    if width >= height:
        height, width = int(longest_edge / aspect), longest_edge
        height += height % 2
    else:
        height, width = longest_edge, int(longest_edge * aspect)
        width += width % 2
    return max(height, 1), max(width, 1)


def tiled_size(height: int, width: int, tile: int) -> tuple[int, int]:
    """Output size with both edges multiples of `tile`: round the longest edge up, scale, round up."""
    aspect = width / height
    if width >= height:
        width = math.ceil(width / tile) * tile
        height = math.ceil(int(width / aspect) / tile) * tile
    else:
        height = math.ceil(height / tile) * tile
        width = math.ceil(int(height * aspect) / tile) * tile
    return height, width


def image_tiles(image: Tensor, cfg: ProcessorConfig) -> tuple[Tensor, int, int]:
    """Cut a uint8 (3, H, W) image into tiles: (rows * cols + 1, 3, t, t) uint8, rows, cols.

    The tiles come row by row, then the global image (the whole image squashed to one tile).
    An image that fits one tile, or any image when splitting is off, is one tile: rows = cols = 0.
    """
    t = cfg.tile_size
    image = resize(image, *longest_edge_size(*image.shape[-2:], cfg.longest_edge), cfg.resample)
    if not cfg.do_image_splitting:
        return resize(image, t, t, cfg.resample)[None], 0, 0
    image = resize(image, *tiled_size(*image.shape[-2:], t), cfg.resample)
    height, width = image.shape[-2:]
    if height <= t and width <= t:
        return image[None], 0, 0
    rows, cols = height // t, width // t
    tiles = image.reshape(3, rows, t, cols, t).permute(1, 3, 0, 2, 4).reshape(rows * cols, 3, t, t)
    return torch.cat([tiles, resize(image, t, t, cfg.resample)[None]]), rows, cols


def video_tiles(frames: Tensor, cfg: ProcessorConfig) -> Tensor:
    """Resize uint8 (T, 3, H, W) frames like unsplit images: to the longest edge, then to one tile."""
    frames = resize(frames, *longest_edge_size(*frames.shape[-2:], cfg.video_longest_edge), cfg.resample)
    return resize(frames, cfg.tile_size, cfg.tile_size, cfg.resample)


def normalize(pixels: Tensor, cfg: ProcessorConfig) -> Tensor:
    """uint8 pixels to float32 ((x * rescale_factor) - mean) / std, per channel (dim -3)."""
    mean = torch.tensor(cfg.image_mean).view(-1, 1, 1) * (1 / cfg.rescale_factor)
    std = torch.tensor(cfg.image_std).view(-1, 1, 1) * (1 / cfg.rescale_factor)
    return (pixels.float() - mean) / std


# ----------------------------------------------------------------------------------------------
# Text


def apply_chat_template(messages: list[dict], add_generation_prompt: bool = True) -> str:
    """SmolVLM2's chat template (the one transformers uses for images and video), in Python.

    messages: [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe."}]}]
    (content may also be a plain string) gives "<|im_start|>User:<image>Describe.<end_of_utterance>\\n"
    and, with add_generation_prompt, "Assistant:" after it. The role is capitalized and followed by
    ":" when the content starts with an image, else by ": ".
    """
    text = "<|im_start|>"
    for message in messages:
        content = message["content"]
        text += message["role"].capitalize()
        if isinstance(content, str):
            text += ": " + content
        else:
            text += ":" if content and content[0]["type"] == "image" else ": "
            for part in content:
                if part["type"] == "text":
                    text += part["text"]
                elif part["type"] == "image":
                    text += IMAGE_TOKEN
                elif part["type"] == "video":
                    text += VIDEO_TOKEN
        text += END_OF_UTTERANCE + "\n"
    if add_generation_prompt:
        text += "Assistant:"
    return text


def image_prompt(rows: int, cols: int, image_seq_len: int) -> str:
    """The token string standing for one image: its tiles row by row, then its global image.

    Each tile is <fake_token_around_image><row_i_col_j> followed by image_seq_len <image>, each row of
    tiles ends with a newline; the global image is <fake_token_around_image><global-img> with its
    <image> tokens, closed by <fake_token_around_image> (after a blank line if there were tiles).
    """
    tokens = IMAGE_TOKEN * image_seq_len
    text = ""
    for i in range(rows):
        text += "".join(f"{FAKE_IMAGE_TOKEN}<row_{i + 1}_col_{j + 1}>{tokens}" for j in range(cols)) + "\n"
    if rows:
        text += "\n"
    return text + f"{FAKE_IMAGE_TOKEN}{GLOBAL_IMAGE_TOKEN}{tokens}{FAKE_IMAGE_TOKEN}"


def video_prompt(timestamps: list[float], duration: float, image_seq_len: int) -> str:
    """The token string standing for a video: a header, then each frame as an unsplit image.

    "You are provided the following series of sixty-four frames from a 0:01:04 [H:MM:SS] video.\\n",
    then per frame "\\nFrame from MM:SS:" and its image tokens, then a blank line.
    """
    text = (f"You are provided the following series of {number_to_words(len(timestamps))} frames "
            f"from a {timedelta(seconds=int(duration))} [H:MM:SS] video.\n")
    for t in timestamps:
        text += f"\nFrame from {int(t // 60):02d}:{int(t % 60):02d}:" + image_prompt(0, 0, image_seq_len)
    return text + "\n\n"


ONES = ("zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen "
        "fifteen sixteen seventeen eighteen nineteen").split()
TENS = "_ _ twenty thirty forty fifty sixty seventy eighty ninety".split()
SCALES = ("", " thousand", " million", " billion")


def number_to_words(n: int) -> str:
    """English cardinal, written like the num2words package the reference uses: 1234 ->
    "one thousand, two hundred and thirty-four"."""

    def below_thousand(k: int) -> str:
        hundreds, rest = divmod(k, 100)
        if rest < 20:
            rest_words = ONES[rest]
        else:
            rest_words = TENS[rest // 10] + (f"-{ONES[rest % 10]}" if rest % 10 else "")
        if not hundreds:
            return rest_words
        return f"{ONES[hundreds]} hundred" + (f" and {rest_words}" if rest else "")

    groups, scale = [], 0
    while n:
        n, k = divmod(n, 1000)
        if k:
            groups.insert(0, (k, scale))
        scale += 1
    if not groups:
        return ONES[0]
    words = [below_thousand(k) + SCALES[s] for k, s in groups]
    if len(words) == 1:
        return words[0]
    last, last_scale = groups[-1]
    joiner = " and " if last_scale == 0 and last < 100 else ", "
    return ", ".join(words[:-1]) + joiner + words[-1]


# ----------------------------------------------------------------------------------------------
# The processor


def read_json(path: Path) -> dict:
    """A JSON file's contents, or {} when the file is absent."""
    return json.loads(path.read_text()) if path.is_file() else {}


def token_content(token: str | dict | None) -> str | None:
    """tokenizer_config.json stores a special token as a string or as {"content": ...}."""
    return token["content"] if isinstance(token, dict) else token


class Processor:
    """SmolVLM2's processor: chat or prompt, images and a video in; model inputs and grids out.

    processor(messages, images=[...], video=...) returns a dict for one sample:
      input_ids (1, L) long, attention_mask (1, L) long (all ones),
      pixel_values (N, 3, t, t) float32 and pixel_attention_mask (N, t, t) bool (all True: every
      tile is a full tile), the N tiles and frames in the order their tokens appear,
      grids [[(frames, rows, cols), ...]]: one list for the sample, one shape per visual grid.
    Use `collate` to batch several samples.
    """

    def __init__(self, tokenizer: Tokenizer, cfg: ProcessorConfig | None = None):
        self.tokenizer = tokenizer
        self.cfg = cfg or ProcessorConfig()
        side = math.isqrt(self.cfg.image_seq_len)
        if side * side != self.cfg.image_seq_len:
            raise InputError(f"image_seq_len {self.cfg.image_seq_len} is not a square grid of tokens")
        self.grid_side = side
        self.image_token_id = self.token_id(IMAGE_TOKEN)
        self.eos_token_id = self.token_id(self.cfg.eos_token)
        self.pad_token_id = self.token_id(self.cfg.pad_token)

    @property
    def image_seq_len(self) -> int:
        """<image> tokens per tile or video frame (grid_side ** 2)."""
        return self.cfg.image_seq_len

    def token_id(self, token: str) -> int:
        """The id of a special token, which the tokenizer must know."""
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise InputError(f"the tokenizer has no token {token!r}")
        return token_id

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> Processor:
        """Load from a Hub checkpoint folder (e.g. a snapshot of HuggingFaceTB/SmolVLM2-256M-Video-Instruct).

        Reads tokenizer.json (required), tokenizer_config.json (eos_token, pad_token),
        preprocessor_config.json (size, max_image_size, do_image_splitting, resample, image_mean,
        image_std, rescale_factor, video_sampling), video_preprocessor_config.json when present (for
        the video settings, else preprocessor_config.json is used), processor_config.json
        (image_seq_len, else computed from config.json's vision_config image_size / patch_size and
        scale_factor). A key no file has keeps its ProcessorConfig default (SmolVLM2-256M's values).
        """
        directory = Path(directory)
        if not (directory / "tokenizer.json").is_file():
            raise FileNotFoundError(f"no tokenizer.json in {directory}: pass a SmolVLM2 checkpoint folder")
        pre = read_json(directory / "preprocessor_config.json")
        vid = read_json(directory / "video_preprocessor_config.json") or pre
        tok = read_json(directory / "tokenizer_config.json")
        model = read_json(directory / "config.json")
        seq_len = read_json(directory / "processor_config.json").get("image_seq_len")
        vision = model.get("vision_config", {})
        if seq_len is None and {"image_size", "patch_size"} <= vision.keys() and "scale_factor" in model:
            seq_len = (vision["image_size"] // vision["patch_size"]) ** 2 // model["scale_factor"] ** 2

        default = ProcessorConfig()
        sampling = vid.get("video_sampling", {})
        video_size = vid.get("size", sampling.get("video_size", {}))
        cfg = ProcessorConfig(
            image_seq_len=seq_len or default.image_seq_len,
            longest_edge=pre.get("size", {}).get("longest_edge", default.longest_edge),
            tile_size=pre.get("max_image_size", {}).get("longest_edge", default.tile_size),
            do_image_splitting=pre.get("do_image_splitting", default.do_image_splitting),
            resample=pre.get("resample", default.resample),
            image_mean=tuple(pre.get("image_mean", default.image_mean)),
            image_std=tuple(pre.get("image_std", default.image_std)),
            rescale_factor=pre.get("rescale_factor", default.rescale_factor),
            video_longest_edge=video_size.get("longest_edge", default.video_longest_edge),
            video_fps=sampling.get("fps", default.video_fps),
            video_max_frames=sampling.get("max_frames", default.video_max_frames),
            eos_token=token_content(tok.get("eos_token")) or default.eos_token,
            pad_token=token_content(tok.get("pad_token")) or default.pad_token,
        )
        if max(cfg.longest_edge, cfg.video_longest_edge) > 4096:
            raise InputError("SmolVLM caps images at 4096 px: set size.longest_edge to 4096 or less")
        return cls(Tokenizer.from_file(str(directory / "tokenizer.json")), cfg)

    def __call__(self, prompt: str | list[dict], images: list[Tensor | str | Path] = (),
                 video: Video | str | Path | None = None, add_generation_prompt: bool = True) -> dict:
        """Prepare one sample.

        prompt: a chat (list of messages, see apply_chat_template) or a prompt string in which each
        "<image>" stands for the next of `images` (uint8 (3, H, W) tensors or file paths) and
        "<video>" for `video` (a Video, or a path sampled with the config's fps and max_frames).
        """
        text = prompt if isinstance(prompt, str) else apply_chat_template(prompt, add_generation_prompt)
        pieces = re.split(f"({re.escape(IMAGE_TOKEN)}|{re.escape(VIDEO_TOKEN)})", text)
        n_images, n_videos = pieces.count(IMAGE_TOKEN), pieces.count(VIDEO_TOKEN)
        if n_images != len(images) or n_videos != (video is not None):
            raise InputError(f"the prompt has {n_images} {IMAGE_TOKEN} and {n_videos} {VIDEO_TOKEN} placeholders "
                             f"but {len(images)} images and {int(video is not None)} video were given")
        if isinstance(video, (str, Path)):
            video = load_video(video, self.cfg.video_fps, self.cfg.video_max_frames)

        remaining = iter(images)
        side = self.grid_side
        parts, pixels, grids = [], [], []
        for piece in pieces:
            if piece == IMAGE_TOKEN:
                image = next(remaining)
                tiles, rows, cols = image_tiles(load_image(image) if isinstance(image, (str, Path)) else image,
                                                self.cfg)
                parts.append(image_prompt(rows, cols, self.image_seq_len))
                pixels.append(tiles)
                grids += [(1, side, side)] * len(tiles)
            elif piece == VIDEO_TOKEN:
                parts.append(video_prompt(video.timestamps, video.duration, self.image_seq_len))
                pixels.append(video_tiles(video.frames, self.cfg))
                grids.append((len(video.frames), side, side))
            else:
                parts.append(piece)

        ids = torch.tensor([self.tokenizer.encode("".join(parts)).ids], dtype=torch.long)
        t = self.cfg.tile_size
        pixel_values = normalize(torch.cat(pixels), self.cfg) if pixels else torch.zeros(0, 3, t, t)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "pixel_values": pixel_values,
            "pixel_attention_mask": torch.ones(len(pixel_values), t, t, dtype=torch.bool),
            "grids": [grids],
        }

    def collate(self, samples: list[dict]) -> dict:
        """Batch processed samples: input_ids right-padded with the pad id, attention_mask (B, L)
        1 on real tokens and 0 on padding, pixel_values / pixel_attention_mask concatenated in
        sample order, grids one list per sample."""
        length = max(s["input_ids"].shape[1] for s in samples)
        input_ids = torch.full((len(samples), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
        for b, sample in enumerate(samples):
            n = sample["input_ids"].shape[1]
            input_ids[b, :n] = sample["input_ids"][0]
            attention_mask[b, :n] = sample["attention_mask"][0]
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "pixel_values": torch.cat([s["pixel_values"] for s in samples]),
            "pixel_attention_mask": torch.cat([s["pixel_attention_mask"] for s in samples]),
            "grids": [g for s in samples for g in s["grids"]],
        }

    def decode(self, ids: Tensor | list[int], skip_special_tokens: bool = True) -> str:
        """Token ids (a list or a 1-D tensor) back to text."""
        return self.tokenizer.decode(ids.tolist() if isinstance(ids, Tensor) else list(ids),
                                     skip_special_tokens=skip_special_tokens)


# ----------------------------------------------------------------------------------------------
# A stand-in tokenizer, for checkpoints with random weights (distill.py --smoke, the tests)

STAND_IN_SPECIAL_TOKENS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>", GLOBAL_IMAGE_TOKEN]
                           + [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
                           + [FAKE_IMAGE_TOKEN, IMAGE_TOKEN, END_OF_UTTERANCE])


def write_stand_in_tokenizer(directory: Path) -> Tokenizer:
    """Write a stand-in for SmolVLM2's tokenizer (tokenizer.json, tokenizer_config.json) and return it.

    Byte-level BPE without merges, one token per byte of text, plus SmolVLM2's special tokens: chats,
    images and videos become the same token layout as with the real tokenizer, with more text tokens.
    Its 299 ids fit any decoder whose vocab_size is at least that.
    """
    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in STAND_IN_SPECIAL_TOKENS])
    tokenizer.save(str(Path(directory) / "tokenizer.json"))
    (Path(directory) / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|im_start|>", "eos_token": END_OF_UTTERANCE, "pad_token": "<|im_end|>",
        "unk_token": "<|endoftext|>", "clean_up_tokenization_spaces": False,
        "extra_special_tokens": {"end_of_utterance_token": END_OF_UTTERANCE, "fake_image_token": FAKE_IMAGE_TOKEN,
                                 "global_image_token": GLOBAL_IMAGE_TOKEN, "image_token": IMAGE_TOKEN},
        "processor_class": "SmolVLMProcessor", "tokenizer_class": "PreTrainedTokenizerFast"}))
    return tokenizer
