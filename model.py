"""
Open-Qwen2VL's ground floor: the SigLIP towers, the pooling projector, the Qwen2 decoder, the VLM that splices image
features into the token stream, our own checkpoint format, tokenizer and prompt formats, image preprocessing, and the
config parser every stage uses. Foreign checkpoint formats are in weights.py, which builds on this file.
Spec: ../shared/design/reference.md (section numbers below refer to it). Plain PyTorch.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import io
import json
import math
import os
import typing
import warnings
from dataclasses import dataclass, field
from tokenize import COMMENT, generate_tokens

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint
from PIL import Image

IMAGE_ID = -200  # placeholder id of an image in token sequences (the official IMAGE_TOKEN_INDEX)
IGNORE = -100  # target id that never enters the loss

# -----------------------------------------------------------------------------------------------------------------
# Command-line configs: every stage has one dataclass whose fields are its flags.


def boolean(s: str) -> bool:  # a bool flag's value; anything else is argparse's "invalid boolean value"
    return ["0", "false", "no", "off", "1", "true", "yes", "on"].index(s.lower()) > 3


def parse_config(cls, argv=None, presets: dict | None = None, prog: str | None = None):
    """Build dataclass `cls` from flags: field `seq_len` is `--seq-len N`. A bool is `--flag`, `--flag false` or
    `--no-flag`. `--preset NAME` applies presets[NAME] under the explicit flags. Unknown flags are an error. `--help`
    gives each flag's default (the default preset's) and the `# comment` ending its field's line in the source."""
    hints = typing.get_type_hints(cls)
    notes = {t.line.split(":")[0].strip(): t.string[1:].strip() for c in cls.__mro__[-2::-1]  # field -> its comment
             for t in generate_tokens(io.StringIO(inspect.getsource(c)).readline) if t.type == COMMENT}  # subclass wins
    doc = cls.__doc__ if not cls.__doc__.startswith(cls.__name__ + "(") else inspect.getmodule(cls).__doc__
    p = argparse.ArgumentParser(prog, "%(prog)s [--flag VALUE ...]", doc,  # (a dataclass's default doc: its signature)
                                formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    shown = cls(**(presets or {}).get(getattr(cls, "preset", None), {}))  # what a run without flags uses
    for f in dataclasses.fields(cls):
        flag, kind = "--" + f.name.replace("_", "-"), hints[f.name]
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # list[str], str | None -> str
        kw = dict(nargs="?", const=True) if kind is bool else dict(nargs="+") if typing.get_origin(kind) is list else {}
        note = f"{notes.get(f.name, '')} (default: {getattr(shown, f.name)!r})".replace("%", "%%")
        a = p.add_argument(flag, type=boolean if kind is bool else base, dest=f.name, metavar=base.__name__.upper(),
                           help=note, choices=list(presets) if f.name == "preset" and presets else None, **kw)
        if kind is bool:  # listed once, as `--ac / --no-ac [BOOL]` (option_strings are only shown once added)
            p.add_argument("--no-" + flag[2:], action="store_const", const=False, dest=f.name, help=argparse.SUPPRESS)
            a.option_strings = [f"{flag} / --no-{flag[2:]}"]
    given = {k: v for k, v in vars(p.parse_args(argv)).items() if v is not None}
    return cls(**{**(presets or {}).get(given.get("preset", getattr(cls, "preset", None)), {}), **given})


def need(path: str, hint: str, marker: str = "", hub: bool = False) -> str:
    """A command's input, checked where first used: missing (or without `marker` in it) is one line naming it and
    what to run first, not a traceback. hub: `owner/name` with no local `owner` is a hub id, left to the loader."""
    if not os.path.exists(os.path.join(path, marker) if marker else path) and not (
            hub and path.count("/") == 1 and not os.path.exists(path.split("/")[0] or "/")):
        what = f"no {marker} in it" if os.path.isdir(path) else "not found"
        raise SystemExit(f"error: {path or '(none given)'}: {what}; {hint}")
    return path


# -----------------------------------------------------------------------------------------------------------------
# Tokenizer and prompt formats (reference.md §1.6-1.8)


class Tokenizer:
    """Qwen2.5's BPE (tokenizer.json) plus the paper's `<|endofchunk|>` (new: 151665) and `<s>` (the BOS: Qwen2.5's BPE
    token 128245, marked special). Text is plain text: "<|im_end|>" or "<tool_call>" in a caption stays text."""

    ADDED = ["<|endofchunk|>", "<s>"]

    def __init__(self, path: str):
        import tokenizers
        path = os.path.join(path, "tokenizer.json") if os.path.isdir(path) else path
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no tokenizer.json at {path}")
        self.tok = tokenizers.Tokenizer.from_file(path)
        self.tok.add_special_tokens(self.ADDED)  # an existing token keeps its id and becomes special
        added = self.tok.get_added_tokens_decoder()
        self.special_ids = {i for i, t in added.items() if t.special}  # skipped by decode; <tool_call> & co. are text
        # Qwen2.5's non-special added tokens would still be matched in text: mark them special so they are not
        self.tok.add_special_tokens([tokenizers.AddedToken(t.content, special=True) for t in added.values()
                                     if not t.special])
        self.tok.encode_special_tokens = True
        ids = {t: self.tok.token_to_id(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", *self.ADDED)}
        if None in ids.values():
            raise ValueError(f"{path}: tokenizer lacks {[t for t, i in ids.items() if i is None]}")
        self.pad_id, self.im_start_id, self.eos_id, self.eoc_id, self.bos_id = ids.values()

    def __len__(self):
        return self.tok.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids if text else []

    def decode(self, ids, skip_special: bool = True) -> str:
        ids = [int(i) for i in ids if i >= 0 and not (skip_special and i in self.special_ids)]
        return self.tok.decode(ids, skip_special_tokens=False)

    def encode_with_images(self, text: str) -> list[int]:
        """Each "<image>" -> one IMAGE_ID, chunks tokenized apart: tokenizer_image_token without its quirk (§1.6)."""
        first, *rest = [self.encode(chunk) for chunk in text.split("<image>")]
        return first + [i for chunk in rest for i in (IMAGE_ID, *chunk)]


def caption_tokens(tok: Tokenizer, caption: str) -> list[int]:
    """Pre-training sample (§1.8): `<s> [image] "\\n" caption <|im_end|>`. Targets are every token but the image."""
    return [tok.bos_id, IMAGE_ID] + tok.encode("\n" + caption) + [tok.eos_id]


def interleaved_tokens(tok: Tokenizer, items: list[str | None]) -> list[int]:
    """Interleaved doc (§2): None is an image (`[image] "\\n"`), text chunks end in <|endofchunk|>, in <s> ... EOS."""
    out = [tok.bos_id]
    for item in items:
        out += [IMAGE_ID] + tok.encode("\n") if item is None else tok.encode(item) + [tok.eoc_id]
    return out + [tok.eos_id]


SYSTEM_PROMPT = "You are a helpful assistant."


def chat_tokens(tok: Tokenizer, turns: list[dict], style: str = "qwen2", system: str | None = None,
                generation_prompt: bool = False) -> tuple[list[int], list[int]]:
    """SFT conversation (LLaVA format: [{"from": "human"|"gpt", "value": str}, ...]) -> (ids, targets-before-shift).
    Only assistant replies and their end markers are supervised; `labels[i]` is IGNORE or ids[i].

    style="qwen2" (default): the standard Qwen2 chat template after a `<s>` BOS, the image where `<image>` stands:
      <s><|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n{q}<|im_end|>\\n<|im_start|>assistant\\n{a}<|im_end|>\\n
    style="release": what the released Open-Qwen2VL checkpoints were most likely trained with (initial commit
      5e3cb34, §1.8): image first, then `\\n<s>`, no `<|im_start|>` before `assistant`, no newline after it:
      [image]\\n<s><|im_start|>system\\n{sys}<|im_end|>\\n<|im_start|>user\\n\\n{q}<|im_end|>assistant{a}<|im_end|>\\n
      Supported so that fine-tuning or evaluating the released weights uses the format they saw.
    `system` replaces the default system prompt; generation_prompt=True: the turns end with a question and the ids
    end after the assistant header (what a model answers from).
    """
    if generation_prompt and len(turns) % 2 == 0:
        raise ValueError("generation_prompt=True needs the turns to end with a human turn")
    if style not in ("qwen2", "release"):
        raise ValueError(f"unknown chat style {style!r} (qwen2 or release)")
    ids, labels = [], []

    def add(piece: list[int], supervised: bool):
        ids.extend(piece)
        labels.extend(piece if supervised else [IGNORE] * len(piece))

    n_images = sum(t["value"].count("<image>") for t in turns)
    if style == "release" and n_images:
        if n_images != 1:
            raise ValueError("style='release' supports exactly one image per conversation")
        add([IMAGE_ID] + tok.encode("\n"), False)
    add([tok.bos_id, tok.im_start_id] + tok.encode(f"system\n{SYSTEM_PROMPT if system is None else system}") + [tok.eos_id] + tok.encode("\n"),
        False)
    for k, turn in enumerate(turns):
        role = turn.get("from")
        if role not in (("human", "user") if k % 2 == 0 else ("gpt", "assistant")):
            raise ValueError(f"turn {k}: expected {'human' if k % 2 == 0 else 'gpt'}, got {role!r}")
        msg = turn["value"]
        if k % 2 == 0:
            if style == "release":
                body = tok.encode("user\n" + "\n" * ("<image>" in msg) + msg.replace("<image>", "").strip())
                add([tok.im_start_id] + body + [tok.eos_id] + tok.encode("assistant"), False)
            else:
                add([tok.im_start_id] + tok.encode_with_images("user\n" + msg.strip()) + [tok.eos_id]
                    + tok.encode("\n") + [tok.im_start_id] + tok.encode("assistant\n"), False)
        else:
            add(tok.encode(msg.strip() or " ") + [tok.eos_id] + tok.encode("\n"), True)
    return ids, labels


def expand_tiles(tok: Tokenizer, ids: list[int], tiles: list[int], labels: list[int] | None = None):
    """Image k -> tiles[k] images after NVLM's tags <tile_1> .. <tile_{n-1}> <tile_global_thumbnail>, unsupervised"""
    n_tiles, out = iter(tiles), []
    for t, y in zip(ids, ids if labels is None else labels):
        tags = [f"<tile_{k}>" for k in range(1, next(n_tiles))] + ["<tile_global_thumbnail>"] if t == IMAGE_ID else []
        out += [(x, IGNORE) for tag in tags for x in (*tok.encode(tag), IMAGE_ID)] or [(t, y)]
    return [x for x, _ in out], [y for _, y in out]


# -----------------------------------------------------------------------------------------------------------------
# Images (§1.2): any PIL-readable file as RGB, then a bicubic squash to the tower's size and (x - 0.5) / 0.5.

MAX_IMAGE_PIXELS = 89_478_485  # PIL's own default; past it we refuse instead of warning


def load_image(src, name: str = "<bytes>") -> Image.Image:
    """Bytes, a path or a file object -> RGB PIL image: transparency composited on white (as transformers'
    convert_to_rgb), 16-bit scaled to 8 bits, other modes converted; decompression bombs raise, never allocate."""
    name = str(src) if isinstance(src, (str, os.PathLike)) else name
    src = io.BytesIO(src) if isinstance(src, (bytes, bytearray, memoryview)) else src
    with warnings.catch_warnings(action="error", category=Image.DecompressionBombWarning):
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
    if img.mode in ("RGBA", "LA", "PA") or "transparency" in img.info:  # P, RGB and L carry a tRNS colour key
        img = Image.alpha_composite(Image.new("RGBA", img.size, (255, 255, 255, 255)), img.convert("RGBA"))
    return img.convert("RGB")


def image_to_uint8(img: Image.Image, size: int) -> torch.Tensor:
    """Bicubic squash (antialiased by PIL, as torchvision's Resize) -> uint8 (3, size, size): 4x less to move."""
    return torch.from_numpy(np.array(img.resize((size, size), Image.Resampling.BICUBIC), np.uint8)).permute(2, 0, 1)


def normalize_pixels(x: torch.Tensor, dtype=torch.float32) -> torch.Tensor:
    """uint8 [0, 255] -> (x / 255 - 0.5) / 0.5, SigLIP's "inception" normalization."""
    return ((x.to(torch.float32) / 255.0 - 0.5) / 0.5).to(dtype)


def preprocess(src, size: int) -> torch.Tensor:
    """One image (bytes, path or PIL) -> float32 (3, size, size), equal to transformers' SiglipImageProcessor."""
    img = src if isinstance(src, Image.Image) else load_image(src)
    return normalize_pixels(image_to_uint8(img.convert("RGB"), size))


def tile_image(img: Image.Image, size: int, max_tiles: int, thumbnail: bool = True) -> list[Image.Image]:
    """InternVL's dynamic_preprocess (internvl_chat/internvl/train/dataset.py, 1831ceb9), PIL bicubic as InternVL: the
    grid of <= max_tiles tiles nearest w/h (ties: area rule), cut row by row; then, if several, a thumbnail."""
    (w, h), best = img.size, math.inf
    for a, b in ((a, n // a) for n in range(1, max_tiles + 1) for a in range(1, n + 1) if n % a == 0):
        if (d := abs(w / h - a / b)) < best or d == best and w * h > 0.5 * size * size * a * b:
            best, i, j = d, a, b
    big = img.resize((i * size, j * size), Image.Resampling.BICUBIC)
    tiles = [big.crop((c * size, r * size, (c + 1) * size, (r + 1) * size)) for r in range(j) for c in range(i)]
    return tiles + [img.resize((size, size), Image.Resampling.BICUBIC)] * (thumbnail and i * j > 1)


# -----------------------------------------------------------------------------------------------------------------
# Configs. Field names are ours; weights.py reads transformers' config.json files into them.


@dataclass
class VisionConfig:
    image_size: int = 384
    patch_size: int = 14
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    eps: float = 1e-6
    act: str = "gelu_tanh"  # HF configs say gelu_pytorch_tanh; the timm weights the official code ran use exact "gelu"
    use_head: bool = True  # the attention-pooling head, needed for contrastive image embeddings only


@dataclass
class TextConfig:  # SigLIP's text tower
    vocab_size: int = 32000
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    max_positions: int = 64
    projection_size: int = 1152
    eps: float = 1e-6
    act: str = "gelu_tanh"


@dataclass
class QwenConfig:
    vocab_size: int = 151936
    hidden_size: int = 1536
    intermediate_size: int = 8960
    num_layers: int = 28
    num_heads: int = 12
    num_kv_heads: int = 2
    head_dim: int = 128
    rope_theta: float = 1e6
    eps: float = 1e-6
    tie_embeddings: bool = True


def split_heads(x, n: int):  # (B, T, n * head_dim) -> (B, n, T, head_dim), a view
    return x.unflatten(-1, (n, -1)).transpose(1, 2)


def merge_heads(x):  # (B, n, T, head_dim) -> (B, T, n * head_dim)
    return x.transpose(1, 2).flatten(2)


# -----------------------------------------------------------------------------------------------------------------
# SigLIP (§1.1): pre-norm ViT blocks, no class token, learned positions; a text tower and a contrastive head.


class SiglipBlock(nn.Module):
    def __init__(self, c: VisionConfig | TextConfig):
        super().__init__()
        d = c.hidden_size
        self.heads, self.approximate = c.num_heads, "tanh" if c.act == "gelu_tanh" else "none"
        self.norm1, self.norm2 = nn.LayerNorm(d, eps=c.eps), nn.LayerNorm(d, eps=c.eps)
        self.qkv = nn.Linear(d, 3 * d)  # fused q, k, v: one matmul instead of three
        self.proj = nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, c.intermediate_size), nn.Linear(c.intermediate_size, d)

    def forward(self, x):
        q, k, v = split_heads(self.qkv(self.norm1(x)), 3 * self.heads).chunk(3, dim=1)
        return self.mlp(x + self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v))))

    def mlp(self, x):
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate=self.approximate))


class AttentionPoolHead(SiglipBlock):
    """SigLIP's MAP head: a block, no pre-norm, whose one query is a learned probe. Unused by the VLM."""

    def __init__(self, c: VisionConfig):
        super().__init__(c)
        del self.norm1
        self.probe = nn.Parameter(torch.zeros(1, 1, c.hidden_size))

    def forward(self, x):
        q = split_heads(self.qkv(self.probe.expand(x.shape[0], 1, -1)), 3 * self.heads).chunk(3, dim=1)[0]
        _, k, v = split_heads(self.qkv(x), 3 * self.heads).chunk(3, dim=1)
        return self.mlp(self.proj(merge_heads(F.scaled_dot_product_attention(q, k, v))))[:, 0]


class SiglipVision(nn.Module):
    def __init__(self, c: VisionConfig):
        super().__init__()
        self.config, d = c, c.hidden_size
        self.patch_embed = nn.Conv2d(3, d, c.patch_size, c.patch_size)
        self.pos_embed = nn.Parameter(torch.zeros((c.image_size // c.patch_size) ** 2, d))
        self.blocks = nn.ModuleList(SiglipBlock(c) for _ in range(c.num_layers))
        self.post_norm, self.head = nn.LayerNorm(d, eps=c.eps), AttentionPoolHead(c) if c.use_head else None

    def forward(self, pixel_values, layer: int = -2, norm: bool = False):
        """Block `layer`'s output (HF hidden_states[layer]; later blocks skipped), no final LayerNorm: -2 is the VLM's
        features (§1.1), -1 MLM-Filter's. layer=-1, norm=True is HF's last_hidden_state."""
        x = self.patch_embed(pixel_values.to(self.pos_embed.dtype)).flatten(2).transpose(1, 2) + self.pos_embed
        for block in self.blocks[: len(self.blocks) + 1 + layer]:
            x = block(x)
        return self.post_norm(x) if norm else x

    from_pretrained = classmethod(lambda cls, src, **kw: _weights().load_vision(src, **kw))


class SiglipText(nn.Module):
    def __init__(self, c: TextConfig):
        super().__init__()
        d = c.hidden_size
        self.token_embed = nn.Embedding(c.vocab_size, d)
        self.pos_embed = nn.Parameter(torch.zeros(c.max_positions, d))
        self.blocks = nn.ModuleList(SiglipBlock(c) for _ in range(c.num_layers))
        self.final_norm, self.head = nn.LayerNorm(d, eps=c.eps), nn.Linear(d, c.projection_size)

    def forward(self, input_ids):
        """Bidirectional, no padding mask (SigLIP is trained on max_length-padded text); pooled at the last token."""
        x = self.token_embed(input_ids) + self.pos_embed[: input_ids.shape[1]]
        for block in self.blocks:
            x = block(x)
        return self.head(self.final_norm(x)[:, -1])


class Siglip(nn.Module):
    """Both towers and the sigmoid-loss head: filter.py scores image-text pairs with it."""

    def __init__(self, vision: VisionConfig, text: TextConfig):
        super().__init__()
        self.vision, self.text = SiglipVision(vision), SiglipText(text)
        self.logit_scale, self.logit_bias = nn.Parameter(torch.zeros(1)), nn.Parameter(torch.zeros(1))

    def image_embeds(self, pixel_values):  # == transformers' get_image_features (pooled, not normalized)
        return self.vision.head(self.vision(pixel_values, layer=-1, norm=True))

    def text_embeds(self, input_ids):  # == get_text_features
        return self.text(input_ids)

    from_pretrained = classmethod(lambda cls, src, **kw: _weights().load_siglip(src, **kw))


# -----------------------------------------------------------------------------------------------------------------
# Projector (§1.3): adaptive average pooling of the patch grid, then Linear -> exact GELU -> Linear.


def pool_matrix(n_in: int, n_out: int) -> torch.Tensor:
    """adaptive_avg_pool2d as one exact (n_out^2, n_in^2) matrix: 27 -> 12 averages 3-wide windows at 0,2,4,6,9,..."""
    a = F.adaptive_avg_pool1d(torch.eye(n_in, dtype=torch.float64)[None], n_out)[0].T  # (n_out, n_in): 1D bins
    return torch.kron(a, a)


_pool_on = functools.cache(lambda n_in, n_out, device, dtype: pool_matrix(n_in, n_out).to(device, dtype))  # no H2D


class Projector(nn.Module):
    def __init__(self, vision_dim: int, llm_dim: int, grid: int, tokens: int):
        super().__init__()
        self.grid, self.tokens = grid, tokens
        if math.isqrt(tokens) ** 2 != tokens or tokens > grid * grid:
            raise ValueError(f"image tokens must be a square <= {grid * grid}, got {tokens}")
        self.fc1, self.fc2 = nn.Linear(vision_dim, llm_dim), nn.Linear(llm_dim, llm_dim)

    def forward(self, x):  # (N, grid^2, vision_dim) -> (N, tokens, llm_dim)
        if self.tokens != x.shape[1]:
            x = _pool_on(self.grid, math.isqrt(self.tokens), x.device, x.dtype) @ x
        return self.fc2(F.gelu(self.fc1(x)))

    def init_weights(self):
        """PyTorch's default Linear init under seed 1152: the official code seeds with the vision width (§1.3)."""
        torch.manual_seed(1152)
        self.fc1.reset_parameters()
        self.fc2.reset_parameters()
        return self


# -----------------------------------------------------------------------------------------------------------------
# Attention over (packed) rows. One `Attention` per forward, shared by all layers.


@dataclass
class Attention:
    kind: str = "causal"  # causal | docs (per-document SDPA loop) | mask (boolean mask) | flex (block mask)
    segments: list | None = None  # kind=docs: per row, (start, end) of each document
    mask: torch.Tensor | None = None  # kind=mask: (B, 1, Tq, Tk) bool, True may attend
    block_mask: object = None  # kind=flex


def position_ids_from_lens(doc_lens: list[list[int]], device) -> torch.Tensor:
    """Positions restart at 0 at every document, so a packed document sees exactly what it would see alone."""
    return to_device(torch.stack([torch.cat([torch.arange(n) for n in d]) for d in doc_lens]), device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """Host to device without a host sync on CUDA: a pageable copy waits, a pinned non_blocking one does not."""
    return t.pin_memory().to(device, non_blocking=True) if torch.device(device).type == "cuda" else t.to(device)


_flex = _create_block_mask = None  # compiled once, by make_attention: torch.compile takes ~3 s to import
MASKED_GQA_IS_MATH = {"cuda"}  # devices where SDPA with a mask and enable_gqa falls to the math kernel (pytorch#139586)


def make_attention(doc_lens: list[list[int]] | None, device, backend: str = "auto") -> Attention:
    """Document-masked causal attention for packed rows (doc_lens: per row, the lengths of its documents, summing to
    the row length). On GPU flex attention skips the masked blocks entirely. On CPU flex has no backward, so:
    a per-document SDPA loop, or one boolean mask when documents are many and short (machine.md: the mask wins
    past ~32 documents per 2k tokens)."""
    if doc_lens is None or all(len(d) == 1 for d in doc_lens):
        return Attention("causal")
    if backend == "auto":
        mean_len = sum(map(sum, doc_lens)) / sum(map(len, doc_lens))
        backend = "flex" if torch.device(device).type == "cuda" else ("docs" if mean_len >= 64 else "mask")
    if backend == "docs":
        ends = [np.cumsum(d).tolist() for d in doc_lens]
        return Attention("docs", segments=[list(zip([0, *e], e)) for e in ends])
    doc = [torch.repeat_interleave(torch.arange(len(d)), torch.tensor(d)) for d in doc_lens]  # each position's doc
    doc = to_device(torch.stack(doc), device)
    if backend == "mask":
        return Attention("mask", mask=(doc[:, :, None] == doc[:, None, :]).tril()[:, None])
    if backend == "flex":
        global _flex, _create_block_mask
        if _flex is None:  # here, outside any compiled block: a global first set inside one recompiles every block
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            # eager create_block_mask builds the dense B x T x T mask: 2.1 s and +717 MiB at B=4, T=4096 on CPU
            _flex, _create_block_mask = torch.compile(flex_attention, dynamic=False), torch.compile(create_block_mask)

        def same_doc_causal(b, h, q, kv):
            return (doc[b, q] == doc[b, kv]) & (q >= kv)

        B, T = doc.shape
        return Attention("flex", block_mask=_create_block_mask(same_doc_causal, B, None, T, T, device=device))
    raise ValueError(f"unknown attention backend {backend!r}")


def attend(q, k, v, attn: Attention):
    """q (B, H, T, hd); k, v (B, Hkv, S, hd) -> (B, H, T, hd). GQA without materializing repeated heads."""
    if q.shape[2] == 1 and q.device.type == "cpu" and q.dtype != torch.float32 and attn.kind != "flex":
        # a one-query decode step: CPU SDPA runs it 3-28x slower in bf16 than in fp32 (bench/model.py), so upcast
        return attend(q.float(), k.float(), v.float(), attn).to(q.dtype)
    if attn.kind == "causal":
        return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, enable_gqa=True)
    if attn.kind == "mask":
        if q.device.type in MASKED_GQA_IS_MATH:
            k, v = (x.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for x in (k, v))
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn.mask, enable_gqa=q.shape[1] != k.shape[1])
    if attn.kind == "docs":
        return torch.stack([torch.cat([
            F.scaled_dot_product_attention(q[b:b + 1, :, s:e], k[b:b + 1, :, s:e], v[b:b + 1, :, s:e],
                                           is_causal=True, enable_gqa=True)
            for s, e in segs], dim=2)[0] for b, segs in enumerate(attn.segments)])
    g = q.shape[1] // k.shape[1]  # under 128 queries flex picks its decoding kernel, which needs a power-of-2 group
    opts = {"FORCE_USE_FLEX_ATTENTION": True} if q.shape[2] < 128 and g & (g - 1) else None
    return _flex(q, k, v, block_mask=attn.block_mask, enable_gqa=True, kernel_options=opts)


# -----------------------------------------------------------------------------------------------------------------
# Qwen2 decoder (§1.5): RMSNorm, RoPE, GQA with q/k/v bias, SwiGLU; tied or untied head.


class RMSNorm(nn.Module):
    def __init__(self, d: int, eps: float):
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(d))

    def forward(self, x):  # in fp32, then back, as Qwen2 does
        x32 = x.float()
        return self.weight * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype)


def rope(positions, head_dim: int, theta: float, dtype):
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float, device=positions.device) / head_dim))
    f = positions[..., None].float() * inv_freq
    f = torch.cat([f, f], dim=-1)[:, None]  # (B, 1, T, head_dim): broadcast over heads
    return f.cos().to(dtype), f.sin().to(dtype)


def apply_rope(x, cos, sin):
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat([-x2, x1], dim=-1) * sin


class QwenBlock(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        d, hd = c.hidden_size, c.head_dim
        self.heads, self.attn_norm = [c.num_heads, c.num_kv_heads, c.num_kv_heads], RMSNorm(d, c.eps)  # q, k, v heads
        self.qkv = nn.Linear(d, sum(self.heads) * hd, bias=True)  # fused q, k, v (with bias)
        self.o_proj = nn.Linear(c.num_heads * hd, d, bias=False)
        self.mlp_norm = RMSNorm(d, c.eps)
        self.gate_up = nn.Linear(d, 2 * c.intermediate_size, bias=False)  # fused gate and up projections
        self.down = nn.Linear(c.intermediate_size, d, bias=False)

    def forward(self, x, cos, sin, attn: Attention, cache: KVCache | None = None, layer: int = 0):
        q, k, v = split_heads(self.qkv(self.attn_norm(x)), sum(self.heads)).split(self.heads, dim=1)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(layer, k, v)
        x = x + self.o_proj(merge_heads(attend(q, k, v, attn)))
        gate, up = self.gate_up(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.down(F.silu(gate) * up)


class Qwen2(nn.Module):
    def __init__(self, c: QwenConfig):
        super().__init__()
        self.config, self.checkpointing = c, False  # checkpointing: activation checkpointing per block (train.py --ac)
        self.embed_tokens = nn.Embedding(c.vocab_size, c.hidden_size)
        self.layers = nn.ModuleList(QwenBlock(c) for _ in range(c.num_layers))
        self.norm = RMSNorm(c.hidden_size, c.eps)
        self.lm_head = None if c.tie_embeddings else nn.Linear(c.hidden_size, c.vocab_size, bias=False)

    def forward(self, input_ids=None, embeds=None, positions=None, attn: Attention | None = None, targets=None,
                cache: KVCache | None = None, last_only: bool = False):
        """input_ids or embeds (B, T) -> logits (B, T, V); with `targets` (B, T, already shifted, IGNORE where
        unsupervised) -> the *sum* of token cross-entropies in fp32, computing logits only at supervised positions
        (most positions of a pre-training row are image tokens). The caller divides by its global token count."""
        x = self.embed_tokens(input_ids) if embeds is None else embeds
        B, T, _ = x.shape
        if positions is None:
            start = 0 if cache is None else cache.length
            positions = torch.arange(start, start + T, device=x.device).expand(B, T)
        cos, sin = rope(positions, self.config.head_dim, self.config.rope_theta, x.dtype)
        attn = attn or Attention("causal")
        for i, layer in enumerate(self.layers):
            if self.checkpointing and torch.is_grad_enabled():  # keep only block inputs; recompute in backward
                x = torch.utils.checkpoint.checkpoint(layer, x, cos, sin, attn, cache, i, use_reentrant=False)
            else:
                x = layer(x, cos, sin, attn, cache, i)
        if cache is not None:
            cache.length += T
        x, head = self.norm(x), self.embed_tokens.weight if self.lm_head is None else self.lm_head.weight
        if targets is None:
            return F.linear(x[:, -1:] if last_only else x, head)  # last_only: generation's prefill
        keep = targets != IGNORE
        logits = F.linear(x[keep], head).float()
        return F.cross_entropy(logits, targets[keep], reduction="sum")

    from_pretrained = classmethod(lambda cls, src, **kw: _weights().load_qwen(src, **kw))


class KVCache:
    """Preallocated keys and values for every layer; `length` positions are filled."""

    def __init__(self, c: QwenConfig, batch: int, max_len: int, dtype, device):
        shape = (c.num_layers, batch, c.num_kv_heads, max_len, c.head_dim)
        self.k, self.v = (torch.zeros(shape, dtype=dtype, device=device) for _ in "kv")
        self.length = 0

    def update(self, layer: int, k, v):
        end = self.length + k.shape[2]
        self.k[layer, :, :, self.length:end] = k
        self.v[layer, :, :, self.length:end] = v
        return self.k[layer, :, :, :end], self.v[layer, :, :, :end]


# -----------------------------------------------------------------------------------------------------------------
# The VLM (§1.7): image features replace the image placeholders, in order; packed rows attend per document.


@dataclass
class VLMConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    llm: QwenConfig = field(default_factory=QwenConfig)
    image_tokens: int = 144  # per image: 144 (12x12 pooling) in pre-training, 729 (no pooling) in SFT
    feature_layer: int = -2  # the tower's block whose output is used: -2 Open-Qwen2VL (§1.1), -1 MLM-Filter
    max_tiles: int = 1  # NVLM's dynamic high resolution (tile_image) as sft.py --max-tiles tuned it; 1 = one squash


def preset(name: str, vocab_size: int | None = None) -> VLMConfig:
    """`paper`: SigLIP-so400m/14@384 (exact GELU like the official timm weights) + Qwen2.5-1.5B; `tiny`: CPU-sized."""
    if name == "paper":
        return VLMConfig(VisionConfig(act="gelu", use_head=False), QwenConfig(vocab_size or QwenConfig.vocab_size), 144)
    if name == "tiny":
        return VLMConfig(VisionConfig(64, 8, 96, 256, 3, 4, act="gelu", use_head=False),
                         QwenConfig(vocab_size or 4096, 128, 384, 4, 4, 2, 32, 1e4), 16)
    raise ValueError(f"unknown preset {name!r} (tiny or paper)")


def expand_images(ids: np.ndarray, image_tokens: int) -> np.ndarray:
    """One IMAGE_ID per image -> image_tokens of them (the model's sequence)."""
    return np.repeat(ids, np.where(ids == IMAGE_ID, image_tokens, 1))


def collate_rows(rows: list[dict], image_tokens: int, seq_len: int, pad_id: int) -> dict:
    """Packed rows -> model inputs. A row has `input_ids` (one IMAGE_ID per image), `doc_lengths` (its documents'
    lengths in those ids) and optionally `labels` (same length, IGNORE where unsupervised; default: every token but
    images). Returns input_ids and targets (B, seq_len) and doc_lens (per row, expanded document lengths then the
    padding as one more segment). targets[t] is the token after t within its document: the last token of a document,
    images and padding are never supervised."""
    input_ids = np.full((len(rows), seq_len), pad_id, dtype=np.int64)
    targets, doc_lens = np.full((len(rows), seq_len), IGNORE, dtype=np.int64), []
    for b, row in enumerate(rows):
        ids = np.asarray(row["input_ids"], dtype=np.int64)
        labels = np.where(ids == IMAGE_ID, IGNORE, ids if row.get("labels") is None else np.asarray(row["labels"]))
        rep = np.where(ids == IMAGE_ID, image_tokens, 1)
        starts = np.cumsum([0] + list(row["doc_lengths"][:-1]))
        if sum(row["doc_lengths"]) != len(ids):
            raise ValueError(f"row {b}: doc_lengths sum to {sum(row['doc_lengths'])}, row has {len(ids)} ids")
        lens = np.add.reduceat(rep, starts).tolist() if len(ids) else []
        n = sum(lens)
        if n > seq_len:
            raise ValueError(f"row {b}: {n} tokens after image expansion, over seq_len {seq_len}")
        input_ids[b, :n] = np.repeat(ids, rep)
        targets[b, : n - 1] = np.repeat(labels, rep)[1:]
        targets[b, np.cumsum(lens) - 1] = IGNORE  # no prediction across a document boundary
        doc_lens.append(lens + ([seq_len - n] if n < seq_len else []))
    return {"input_ids": torch.from_numpy(input_ids), "targets": torch.from_numpy(targets), "doc_lens": doc_lens}


class VLM(nn.Module):
    def __init__(self, c: VLMConfig):
        super().__init__()
        self.config, self.vision = c, SiglipVision(c.vision)
        self.projector = Projector(c.vision.hidden_size, c.llm.hidden_size, c.vision.image_size // c.vision.patch_size,
                                   c.image_tokens)
        self.llm = Qwen2(c.llm)

    def image_features(self, pixel_values):
        frozen = not any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(torch.is_grad_enabled() and not frozen):  # a frozen tower keeps no activations
            f = self.vision(pixel_values, layer=self.config.feature_layer)
        return self.projector(f.to(self.projector.fc1.weight.dtype))

    def embed(self, input_ids, pixel_values=None):
        x = self.llm.embed_tokens(input_ids.clamp(min=0))
        is_image = input_ids == IMAGE_ID
        n_images = 0 if pixel_values is None else pixel_values.shape[0]
        msg = f"image positions are not {n_images} images x {self.config.image_tokens} tokens"
        if is_image.is_cuda:  # checked on the device: a host-side count would wait for the GPU every micro-batch
            torch._assert_async(is_image.sum() == n_images * self.config.image_tokens, msg)
        elif int(is_image.sum()) != n_images * self.config.image_tokens:
            raise ValueError(f"{msg}: {int(is_image.sum())}")
        if n_images:
            return x.masked_scatter(is_image[..., None], self.image_features(pixel_values).to(x.dtype))
        if self.training:  # every rank runs the tower and projector, or FSDP's collectives would wait forever
            s = self.config.vision.image_size
            dummy = torch.zeros(1, 3, s, s, device=x.device, dtype=self.vision.pos_embed.dtype)
            x = x + 0.0 * self.image_features(dummy).sum().to(x.dtype)
        return x

    def forward(self, input_ids, pixel_values=None, doc_lens=None, targets=None, doc_mask: bool = True,
                backend: str = "auto"):
        """doc_mask=True: each packed document attends only to itself, positions restart per document (our default).
        doc_mask=False: plain causal attention and positions over the whole row, as the paper trained."""
        x = self.embed(input_ids, pixel_values)
        positions, attn = (position_ids_from_lens(doc_lens, x.device), make_attention(doc_lens, x.device, backend)) \
            if doc_mask and doc_lens is not None else (None, Attention("causal"))
        return self.llm(embeds=x, positions=positions, attn=attn, targets=targets)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], pixel_values=None, max_new_tokens: int = 16, stop_ids=(),
                 temperature: float = 0.0, top_p: float = 1.0, seed: int = 0, keep_stop: bool = False,
                 callback=None) -> list[list[int]]:
        """Batched decoding with a KV cache. Prompts hold one IMAGE_ID per image (images in order across the
        batch); they are left-padded. Greedy at temperature 0, else sampled (nucleus top_p, seeded). Returns the new
        tokens of each prompt, without the stop token that ended it (keep_stop=True keeps it, so the caller sees which
        stop id ended each sequence). `callback(tokens, logits)`, if given, sees each step's (B,) tokens and (B, V)
        logits: streaming, or the first position's likelihoods."""
        dev = self.llm.embed_tokens.weight.device
        prompts = [expand_images(np.asarray(p, dtype=np.int64), self.config.image_tokens) for p in prompts]
        B, L = len(prompts), max(map(len, prompts))
        ids = torch.zeros(B, L, dtype=torch.long)
        keys = torch.zeros(B, L + max_new_tokens, dtype=torch.bool)  # real (non-padding) key positions
        for b, p in enumerate(prompts):
            ids[b, L - len(p):] = torch.from_numpy(p)
            keys[b, L - len(p): L] = True
        ids, keys = ids.to(dev), keys.to(dev)
        cache = KVCache(self.llm.config, B, L + max_new_tokens, self.llm.embed_tokens.weight.dtype, dev)

        def attention(T):
            if bool(keys[:, : cache.length + T].all()):  # no left padding: plain causal SDPA, no mask to build
                return Attention("causal")
            q = torch.arange(cache.length, cache.length + T, device=dev)[:, None]
            k = torch.arange(cache.length + T, device=dev)[None]
            m = ((k <= q)[None] & keys[:, None, : cache.length + T]) | (k == q)[None]  # pads see themselves: no NaN
            return Attention("mask", mask=m[:, None])

        positions = (keys[:, :L].cumsum(1) - 1).clamp(min=0)
        logits = self.llm(embeds=self.embed(ids, pixel_values), positions=positions, attn=attention(L), cache=cache,
                          last_only=True)
        logits, pos = logits[:, -1], positions[:, -1:]
        gen, out, done = torch.Generator(dev).manual_seed(seed), [[] for _ in range(B)], [False] * B
        for step in range(max_new_tokens):
            if temperature <= 0:
                tok = logits.argmax(-1)
            else:
                probs = torch.softmax(logits.float() / temperature, -1)
                p_sorted, idx = probs.sort(-1, descending=True)
                p_sorted[(p_sorted.cumsum(-1) - p_sorted) > top_p] = 0  # keep the smallest set with mass >= top_p
                tok = idx.gather(-1, torch.multinomial(p_sorted, 1, generator=gen))[:, 0]
            if callback is not None:
                callback(tok, logits)
            for b, t in enumerate(tok.tolist()):
                if not done[b]:
                    done[b] = t in stop_ids
                    out[b] += [] if done[b] and not keep_stop else [t]
            if all(done) or step == max_new_tokens - 1:
                break
            keys[:, cache.length], pos = True, pos + 1
            logits = self.llm(input_ids=tok[:, None], positions=pos, attn=attention(1), cache=cache)[:, -1]
        return out

    def init_weights(self, seed: int = 0):
        """From scratch (tiny preset, tests): N(0, 0.02) like HF, then the projector as the official code does."""
        torch.manual_seed(seed)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif isinstance(self.get_submodule(name.rpartition(".")[0]), (nn.LayerNorm, RMSNorm)):
                nn.init.ones_(p)
            else:
                nn.init.normal_(p, std=0.02)
        self.projector.init_weights()
        return self

    def save_pretrained(self, out_dir: str):
        save_vlm(out_dir, self.config, self.state_dict())

    from_pretrained = classmethod(lambda cls, src, **kw: _weights().load_vlm(src, **kw))


def save_vlm(out_dir: str, config: VLMConfig, state: dict):
    """config.json + model.safetensors (our names; past 5 GB sharded with an index), each written atomically."""
    os.makedirs(out_dir, exist_ok=True)
    _weights().write_safetensors(out_dir, state.items())
    write_json(os.path.join(out_dir, "config.json"), {"model_type": "open-qwen2vl", **dataclasses.asdict(config)})


def load_vlm(d: str, dtype=None, image_tokens: int | None = None) -> VLM:
    """A VLM saved by save_vlm, bit-identically; `image_tokens` switches the pooling (144 -> 729 for SFT, §1.4)."""
    w = _weights()  # tensor by tensor into `dtype`; a missing, unexpected or mis-shaped tensor is named with the file
    if (c := w.read_config(d)).get("model_type") != "open-qwen2vl":
        raise ValueError(f"{d}: config.json is not an open-qwen2vl VLM (model_type={c.get('model_type')!r})")
    with torch.device("meta"):
        model = VLM(VLMConfig(VisionConfig(**c["vision"]), QwenConfig(**c["llm"]), image_tokens or c["image_tokens"],
                              c.get("feature_layer", -2), c.get("max_tiles", 1)))  # saved before those: -2, 1
    return w.load_into(model, w.read_tensors(d), lambda k: (k, 0, 1), dtype)


def _weights():  # the foreign checkpoint formats live in weights.py, which imports this file
    import weights
    return weights


def write_json(path: str, obj):
    """Atomic (a hidden temp name, then renamed: a reader sees the old file or the whole new one); a str as it is."""
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        f.write(obj if isinstance(obj, str) else json.dumps(obj, indent=1))
    os.replace(tmp, path)
