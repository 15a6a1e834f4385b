"""
Open-Qwen2VL in one file: SigLIP vision and text towers, the average-pooling projector, the Qwen2 decoder, the VLM
that splices image features into the token stream, weight loading/saving, the tokenizer and prompt formats, image
preprocessing, and the small command-line config parser every stage uses.

Spec: ../shared/design/reference.md (section numbers below refer to it). Plain PyTorch; attention goes through
F.scaled_dot_product_attention, or flex attention on GPU for document-masked packed rows.
"""
from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import sys
import typing
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

IMAGE_ID = -200  # placeholder id of an image in token sequences (the official IMAGE_TOKEN_INDEX)
IGNORE = -100  # target id that never enters the loss

# -----------------------------------------------------------------------------------------------------------------
# Command-line configs: every stage has one dataclass whose fields are its flags.


def _parse_bool(s: str) -> bool:
    v = s.lower()
    if v in ("1", "true", "yes", "on"):
        return True
    if v in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"not a boolean: {s!r} (use true/false)")


def parse_config(cls, argv=None, presets: dict | None = None):
    """Build dataclass `cls` from `--field-name value` flags. `--flag` alone sets a bool, `--no-flag` clears it,
    `--flag false` works too. `--preset NAME` applies presets[NAME] before the other flags. Unknown flags are an
    error, never ignored."""
    argv = list(sys.argv[1:] if argv is None else argv)
    hints = typing.get_type_hints(cls)
    fields = {f.name.replace("_", "-"): f.name for f in dataclasses.fields(cls)}
    values: dict = {}
    i = 0
    while i < len(argv):
        arg = argv[i]
        if not arg.startswith("--"):
            raise SystemExit(f"{cls.__name__}: unexpected argument {arg!r}")
        flag, _, inline = arg[2:].partition("=")
        negated = flag.startswith("no-") and flag[3:] in fields and hints[fields[flag[3:]]] is bool
        name = fields.get(flag[3:] if negated else flag)
        if name is None:
            raise SystemExit(f"{cls.__name__}: unknown flag --{flag} (known: {', '.join('--' + k for k in fields)})")
        kind = hints[name]
        if kind is bool:
            nxt = argv[i + 1] if i + 1 < len(argv) else None
            if inline:
                raw = inline
            elif nxt is not None and not nxt.startswith("--"):
                raw, i = nxt, i + 1
            else:
                raw = "true"
            values[name] = (not _parse_bool(raw)) if negated else _parse_bool(raw)
        else:
            if inline:
                raw = inline
            else:
                if i + 1 >= len(argv):
                    raise SystemExit(f"{cls.__name__}: --{flag} needs a value")
                raw, i = argv[i + 1], i + 1
            base = [t for t in typing.get_args(kind) if t is not type(None)][0] if typing.get_args(kind) else kind
            try:
                values[name] = None if raw.lower() == "none" and base is not str else base(raw)
            except ValueError as e:
                raise SystemExit(f"{cls.__name__}: --{flag}: {e}") from None
        i += 1
    preset = values.get("preset", getattr(cls, "preset", None))
    merged = {}
    if presets is not None and preset is not None:
        if preset not in presets:
            raise SystemExit(f"{cls.__name__}: unknown preset {preset!r} (known: {', '.join(presets)})")
        merged.update(presets[preset])
    merged.update(values)
    return cls(**merged)


# -----------------------------------------------------------------------------------------------------------------
# Tokenizer and prompt formats (reference.md §1.6-1.8)


class Tokenizer:
    """Qwen2.5's byte-level BPE from a tokenizer.json, plus the tokens the paper adds: `<|endofchunk|>` and `<s>`
    (the BOS), which land on ids 151665 and 151666 of the Qwen2.5 vocabulary. Text is always encoded as plain text
    (a caption containing "<|im_end|>" does not become the special token); special ids are placed by the formats."""

    ADDED = ["<|endofchunk|>", "<s>"]

    def __init__(self, path: str):
        import tokenizers

        if os.path.isdir(path):
            path = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self.tok = tokenizers.Tokenizer.from_file(path)
        self.tok.add_special_tokens(self.ADDED)  # no-op for tokens the file already has
        self.tok.encode_special_tokens = True  # user text can never inject control tokens

        def id_of(t):
            i = self.tok.token_to_id(t)
            if i is None:
                raise ValueError(f"{path}: tokenizer has no {t!r} token")
            return i

        self.pad_id = id_of("<|endoftext|>")
        self.im_start_id = id_of("<|im_start|>")
        self.eos_id = id_of("<|im_end|>")
        self.eoc_id = id_of("<|endofchunk|>")
        self.bos_id = id_of("<s>")
        self.special_ids = {i for t, i in self.tok.get_vocab(with_added_tokens=True).items()
                            if t.startswith("<|") and t.endswith("|>")} | {self.bos_id}

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids if i >= 0 and not (skip_special and i in self.special_ids)]
        return self.tok.decode(ids, skip_special_tokens=False)

    def encode_with_images(self, text: str) -> list[int]:
        """Text where each literal "<image>" becomes one IMAGE_ID; the chunks between are tokenized separately,
        exactly as the official `tokenizer_image_token` does (minus its token-dropping quirk, §1.6)."""
        out: list[int] = []
        for k, chunk in enumerate(text.split("<image>")):
            if k:
                out.append(IMAGE_ID)
            out += self.encode(chunk)
        return out


def caption_tokens(tok: Tokenizer, caption: str) -> list[int]:
    """Pre-training sample (§1.8): `<s> [image] "\\n" caption <|im_end|>`. Targets are every token but the image."""
    return [tok.bos_id, IMAGE_ID] + tok.encode("\n" + caption) + [tok.eos_id]


def interleaved_tokens(tok: Tokenizer, items: list[str | None]) -> list[int]:
    """Interleaved document (OBELICS-style, §2): None is an image, rendered `[image] "\\n"`; every text chunk is
    followed by `<|endofchunk|>`. Wrapped in `<s> ... <|im_end|>` like a caption."""
    out = [tok.bos_id]
    for item in items:
        out += [IMAGE_ID] + tok.encode("\n") if item is None else tok.encode(item) + [tok.eoc_id]
    return out + [tok.eos_id]


SYSTEM_PROMPT = "You are a helpful assistant."


def chat_tokens(tok: Tokenizer, turns: list[dict], style: str = "qwen2") -> tuple[list[int], list[int]]:
    """SFT conversation (LLaVA format: [{"from": "human"|"gpt", "value": str}, ...]) -> (ids, targets-before-shift).
    Only assistant replies and their end markers are supervised; `labels[i]` is IGNORE or ids[i].

    style="qwen2" (default): the standard Qwen2 chat template after a `<s>` BOS, the image where `<image>` stands:
      <s><|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n
    style="release": what the released Open-Qwen2VL checkpoints were most likely trained with (initial commit
      5e3cb34, §1.8): image first, then `\\n<s>`, no `<|im_start|>` before `assistant`, no newline after it:
      [image]\\n<s><|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n\\n{q}<|im_end|>assistant{a}<|im_end|>\\n
      Supported so that fine-tuning or evaluating the released weights uses the format they saw.
    """
    if style not in ("qwen2", "release"):
        raise ValueError(f"unknown chat style {style!r} (qwen2 or release)")
    ids: list[int] = []
    labels: list[int] = []

    def add(piece: list[int], supervised: bool):
        ids.extend(piece)
        labels.extend(piece if supervised else [IGNORE] * len(piece))

    n_images = sum(t["value"].count("<image>") for t in turns)
    if style == "release" and n_images:
        if n_images != 1:
            raise ValueError("style='release' supports exactly one image per conversation")
        add([IMAGE_ID] + tok.encode("\n"), False)
    add([tok.bos_id, tok.im_start_id] + tok.encode(f"system\n{SYSTEM_PROMPT}") + [tok.eos_id] + tok.encode("\n"),
        False)
    for k, turn in enumerate(turns):
        role = turn.get("from")
        if role not in (("human", "user") if k % 2 == 0 else ("gpt", "assistant")):
            raise ValueError(f"turn {k}: expected {'human' if k % 2 == 0 else 'gpt'}, got {role!r}")
        msg = turn["value"]
        if k % 2 == 0:
            if style == "release":
                body = tok.encode("user\n\n" + msg.replace("<image>", "").strip())
                add([tok.im_start_id] + body + [tok.eos_id] + tok.encode("assistant"), False)
            else:
                add([tok.im_start_id] + tok.encode_with_images("user\n" + msg.strip()) + [tok.eos_id]
                    + tok.encode("\n") + [tok.im_start_id] + tok.encode("assistant\n"), False)
        else:
            add(tok.encode(msg.strip() or " ") + [tok.eos_id] + tok.encode("\n"), True)
    return ids, labels


# -----------------------------------------------------------------------------------------------------------------
# Images (§1.2): any PIL-readable file as RGB, then a bicubic squash to the tower's size and (x - 0.5) / 0.5.

MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default; past it we refuse instead of warning


def load_image(src, name: str = "<bytes>") -> Image.Image:
    """Open bytes, a path or a file object as an RGB PIL image. Alpha is composited on white (as transformers'
    convert_to_rgb does), 16-bit images are scaled to 8 bits, CMYK/palette/grayscale are converted. Decompression
    bombs raise instead of allocating."""
    if isinstance(src, (str, os.PathLike)):
        name = str(src)
    elif isinstance(src, (bytes, bytearray, memoryview)):
        src = io.BytesIO(src)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            img = Image.open(src)
            if img.width * img.height > MAX_IMAGE_PIXELS:
                raise ValueError(f"{name}: image is {img.width}x{img.height}, over the {MAX_IMAGE_PIXELS} pixel limit "
                                 "(decompression bomb?)")
            img.load()
        except (Image.DecompressionBombWarning, Image.DecompressionBombError) as e:
            raise ValueError(f"{name}: refused as a decompression bomb: {e}") from None
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit grayscale: scale to 8 bits instead of clipping
        a = np.asarray(img, dtype=np.float64)
        a = a / 256.0 if img.mode.startswith("I;16") or a.max() > 255 else a
        img = Image.fromarray(np.clip(a, 0, 255).astype(np.uint8), "L")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA"):
        img = img.convert("RGBA")
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        bg.alpha_composite(img)
        img = bg
    return img.convert("RGB")


def image_to_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """Bicubic squash (no aspect preservation, antialiased by PIL, as torchvision's Resize on PIL input) -> uint8
    (3, size, size). Workers return uint8 (4x less to move); `normalize_pixels` finishes on the training device."""
    img = img.resize((size, size), Image.Resampling.BICUBIC)
    return torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)


def normalize_pixels(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> (x / 255 - 0.5) / 0.5, SigLIP's "inception" normalization."""
    return ((x.to(torch.float32) / 255.0 - 0.5) / 0.5).to(dtype)


def preprocess(src, size: int) -> torch.Tensor:
    """One image (bytes, path or PIL) -> float32 (3, size, size), equal to transformers' SiglipImageProcessor."""
    img = src if isinstance(src, Image.Image) else load_image(src)
    return normalize_pixels(image_to_uint8(img.convert("RGB"), size))
