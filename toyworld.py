"""
The toy world: a small, procedurally generated multimodal world in the *real* on-disk formats, so that every stage
(filter, pack, train, sft, eval) runs, and learns something measurable, on a laptop CPU. It plays the role of
nanoGPT's Shakespeare. Images are flat shapes (colour, shape, count, position, size, background, sometimes a word);
captions and questions are generated from the same scene, so they are informative of the image.

    python toyworld.py                        # build into cache/toyworld (what train.py uses when given no data)
    python toyworld.py --out /tmp/tw --seed 1 --image-size 384
    python toyworld.py --samples docs --image-size 128      # the two sample images shown in the README

A world dir holds tokenizer.json, pool/*.tar (img2dataset-style WebDataset shards), sft/ (LLaVA format), eval/
(VLMEvalKit's TSVs: MMBench_DEV_EN, POPE, TextVQA_VAL, MUIRBench) and manifest.json (counts per file and the ground
truth: every scene, the wrong captions, the broken records). README.md, "The toy world", describes the formats.

The same seed gives byte-identical files. Evaluation scenes are held out by construction: a scene's content
signature (background, colour/shape/count kinds, word) hashes into the eval or the training partition, and every
generator accepts only scenes of its own partition.
"""
from __future__ import annotations

import base64
import csv
import dataclasses
import hashlib
import io
import json
import math
import os
import random
import shutil
import sys
import time
import zlib
from collections import Counter

from PIL import Image, ImageDraw, ImageFont

from model import SYSTEM_PROMPT, Tokenizer, parse_config
from pack import tar_member  # the packer's tar member: fixed metadata (mtime 0, owner 0), so same members, same bytes


@dataclasses.dataclass
class Config:
    """python toyworld.py [--out DIR] [--seed N] [--n-pool N] [--n-sft N] [--n-eval N] [--image-size PX]
    [--text-size F] [--wrong-share F] [--shard-size N] [--samples DIR]"""
    out: str = ""  # the world dir; empty: cache/toyworld next to this file
    seed: int = 0  # the same seed gives byte-identical files
    n_pool: int = 20000  # pre-training pairs
    n_sft: int = 10000  # SFT conversations
    n_eval: int = 1000  # questions in each evaluation set
    image_size: int = 64  # pixels a side; 384 is the paper's
    text_size: float = 0.0  # words in SFT and eval images this share of the side tall (0.05: small print that a 64 px
    # squash blurs, for sft.py/eval.py --max-tiles); 0 = the pool's 0.17, readable at 64 px
    wrong_share: float = 0.1  # the share of pool pairs that carry the caption of another scene
    shard_size: int = 2500  # pool pairs per tar shard
    samples: str = ""  # instead of building: write two sample pool images (PNG) into this dir, print their captions


DEFAULTS = {k: v for k, v in dataclasses.asdict(Config()).items() if k not in ("out", "samples")}  # build()'s settings
VERSION = 4  # bump when the output changes, so that ensure() rebuilds stale caches
VOCAB_SIZE = 3000  # BPE target; the toy language saturates below it (~1.8k merges and bytes)
BROKEN_KINDS = ("truncated_jpeg", "zero_byte_image", "empty_caption", "missing_txt", "huge_caption", "cmyk_jpeg",
                "png_alpha")

# -----------------------------------------------------------------------------------------------------------------
# The world's vocabulary. Colours are far apart in RGB, so that a 64 px JPEG keeps them apart.

COLORS = {"red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (245, 220, 30), "green": (40, 160, 60),
          "blue": (40, 90, 220), "purple": (140, 60, 180), "pink": (245, 130, 200), "brown": (110, 60, 20),
          "white": (250, 250, 250), "black": (20, 20, 20)}
BACKGROUNDS = {"white": (250, 250, 250), "black": (20, 20, 20), "gray": (128, 128, 128), "beige": (230, 215, 180)}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
POSITIONS = ("top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right")
POS_PHRASE = {p: ("in the {} corner" if " " in p else "at the {}" if p in ("top", "bottom") else "in the {}"
                  if p == "center" else "on the {}").format(p) for p in POSITIONS}
NUM = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
# Words for signs: at most 5 letters (they must fit a 64 px image), none that names a colour, shape or position.
WORDS = ("cat dog sun moon tree fish bird frog duck bear lion milk cake book door shop cafe park open stop exit sale "
         "home rain snow wind boat ship car bus taxi road hill lake sea sky fire ice gold kiwi lamp rose egg toy jam "
         "tea map key pen cup hat apple bread chair clock cloud grass horse house juice lemon mango music night ocean "
         "paper piano pizza plant queen radio river robot salad sheep smile snake spoon storm sugar table tiger towel "
         "train truck water whale zebra bank bell belt bike boot bowl cave city coat corn desk farm film flag fork game "
         "gate girl hand hero hole idea iron jazz kite king lane leaf lily lock love mail mask meal menu mint moth nest "
         "note oven page path pear pie pool post quiz ring rock roof rope sand seed sock song soup team tent toad town "
         "tube vase wall wave wolf wood yard yoga zone").split()
# Web boilerplate around some captions (alt text is rarely clean): it adds words, not information.
PREFIXES = ("Royalty free vector illustration of", "Stock image of", "Kids learning card with", "Cute cartoon of",
            "Preschool worksheet showing", "Free printable flashcard with", "Minimal geometric poster with",
            "Educational picture for toddlers with", "Flat design sticker with", "Hand drawn doodle of",
            "Colorful wallpaper with", "Logo template made of", "Greeting card featuring", "Embroidery pattern of",
            "Screenshot of a puzzle game with", "Board game piece design:", "Felt craft idea:", "Quilt block with")
SUFFIXES = (" - stock vector", " | free download", " #shapes #kids #learning", " (clipart)", " for kindergarten",
            " - high quality print", " in flat style", " | HD wallpaper", ", available in several sizes",
            " - part of a bigger collection", " by an unknown artist", ", scanned from an old textbook")
FILLERS = ("The shapes are flat and have no outlines.", "Nothing else is visible.", "The shapes do not overlap.",
           "It looks like a page from a picture book for small children.", "The edges are sharp and simple.",
           "There are no shadows, gradients or textures anywhere.", "Such pictures are often used to teach counting.",
           "Everything is arranged on an invisible grid of nine cells.", "The composition feels calm and balanced.",
           "A teacher might ask pupils to name each object.", "It resembles a tile from a memory matching game.",
           "The drawing was probably made with a computer program.", "No people, animals or buildings appear.")

# Which colours are visible on which background, and which are legible as text on it.
OBJ_COLORS = {bg: [c for c in COLORS if math.dist(COLORS[c], rgb) > 100] for bg, rgb in BACKGROUNDS.items()}
TEXT_COLORS = {bg: [c for c in COLORS if math.dist(COLORS[c], rgb) > 160] for bg, rgb in BACKGROUNDS.items()}
KINDS = {bg: [(c, s) for c in OBJ_COLORS[bg] for s in SHAPES] for bg in BACKGROUNDS}
# Unit polygons (radius 1 around the centre, areas roughly comparable); a circle is drawn as an ellipse.
POLYGONS = {"square": [(-.85, -.85), (.85, -.85), (.85, .85), (-.85, .85)],
            "triangle": [(0, -1), (.95, .75), (-.95, .75)],
            "star": [((1 if k % 2 == 0 else .45) * math.cos(math.pi * k / 5 - math.pi / 2),
                      (1 if k % 2 == 0 else .45) * math.sin(math.pi * k / 5 - math.pi / 2)) for k in range(10)],
            "diamond": [(0, -1), (.8, 0), (0, 1), (-.8, 0)]}

# -----------------------------------------------------------------------------------------------------------------
# Scenes. A scene is plain JSON (the manifest keeps every one as ground truth):
#   {"bg": str, "objects": [[colour, shape, position, size, x, y, r], ...], "text": [word, colour, "top"|"bottom", x]}
# x, y, r are fractions of the image side, so the same scene renders at any resolution.


def groups(scene):
    """[(colour, shape, count)] in order of first appearance."""
    return [(c, s, n) for (c, s), n in Counter((o[0], o[1]) for o in scene["objects"]).items()]


def signature(scene) -> str:
    """What a scene shows, ignoring geometry: two scenes with one signature count as the same scene."""
    kinds = "+".join(sorted(f"{n} {c} {s}" for c, s, n in groups(scene)))
    return f"{scene['bg']}|{kinds}|{scene['text'][0] if scene['text'] else ''}"


def is_eval(scene) -> bool:
    """The held-out partition: about 1 signature in 10, fixed by the content alone (not by seed or order)."""
    return zlib.crc32(signature(scene).encode()) % 10 == 0


def sample_scene(rng, split, text=None, bg=None, min_kinds=1):
    """A random scene of partition `split` ("train" or "eval"). text=True/False forces a word on or off."""
    while True:
        bg_ = bg or rng.choice(list(BACKGROUNDS))
        cells, tx = list(range(9)), None
        if rng.random() < 0.3 if text is None else text:  # a word or number in the top or bottom row
            where = rng.choice(("top", "bottom"))
            cells = [k for k in cells if k // 3 != (0 if where == "top" else 2)]
            word = str(rng.randrange(1000)) if rng.random() < 0.3 else rng.choice(WORDS)
            tx = [word.upper() if rng.random() < 0.25 else word, rng.choice(TEXT_COLORS[bg_]), where,
                  round(rng.uniform(0.4, 0.6), 3)]
        kinds = rng.sample(KINDS[bg_], max(min_kinds, rng.choices((1, 2, 3), (55, 35, 10))[0]))
        counts = [rng.choices((1, 2, 3, 4), (40, 25, 20, 15))[0] for _ in kinds]
        while sum(counts) > len(cells):
            counts[counts.index(max(counts))] -= 1
        rng.shuffle(cells)
        objects = []
        for (c, s), n in zip(kinds, counts):
            for cell in (cells.pop() for _ in range(n)):  # one object per grid cell: no overlaps
                rf = rng.uniform(0.28, 0.46)  # radius as a fraction of the cell; the jitter keeps it inside
                jx, jy = rng.uniform(-1, 1) * (0.5 - rf) * 0.9, rng.uniform(-1, 1) * (0.5 - rf) * 0.9
                size = "small" if rf < 0.34 else "large" if rf > 0.40 else "medium"
                objects.append([c, s, POSITIONS[cell], size, round((cell % 3 + 0.5 + jx) / 3, 3),
                                round((cell // 3 + 0.5 + jy) / 3, 3), round(rf / 3, 3)])
        scene = {"bg": bg_, "objects": objects, "text": tx}
        if is_eval(scene) == (split == "eval"):
            return scene


_FONTS = {}


def render(scene, size, rgba=False, text_size=0.0) -> Image.Image:
    """Draw a scene at size x size. rgba=True leaves the background transparent (the png_alpha record); text_size:
    the word's height as a share of the side (0 = 0.17)."""
    bg = BACKGROUNDS[scene["bg"]]
    img = Image.new("RGBA" if rgba else "RGB", (size, size), bg + (0,) if rgba else bg)
    d = ImageDraw.Draw(img)
    for c, s, _, _, x, y, r in scene["objects"]:
        cx, cy, r = x * size, y * size, r * size
        if s == "circle":
            d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=COLORS[c])
        else:
            d.polygon([(cx + u * r, cy + v * r) for u, v in POLYGONS[s]], fill=COLORS[c])
    if scene["text"]:
        word, c, where, x = scene["text"]
        px = max(6, round(size * (text_size or 0.17)))  # PIL's bundled font, scaled: about 11 px tall at 64 px
        if px not in _FONTS:
            _FONTS[px] = ImageFont.load_default(size=px)
        d.text((x * size, size / 6 if where == "top" else size * 5 / 6), word, fill=COLORS[c], font=_FONTS[px],
               anchor="mm")
    return img


def encode(img, fmt="JPEG") -> bytes:
    """Fixed encoder settings (same pixels, same bytes); 4:4:4 chroma keeps the colours of small shapes crisp."""
    buf = io.BytesIO()
    img.save(buf, fmt, **({"quality": 90, "subsampling": 0, "optimize": False} if fmt == "JPEG" else {}))
    return buf.getvalue()


# -----------------------------------------------------------------------------------------------------------------
# Language: captions and question/answer pairs, all generated from the scene.

def _a(word):
    return "an" if word[0] in "aeiou" else "a"


def _join(xs):
    return xs[0] if len(xs) == 1 else ", ".join(xs[:-1]) + " and " + xs[-1]


def _cap(s):
    return s[0].upper() + s[1:]


def _pl(word, n):
    return word if n == 1 else word + "s"


def _text_phrase(scene):
    w = scene["text"][0]
    return f"the number {w}" if w.isdigit() else f'the word "{w}"'


def long_caption(rng, scene):
    """A multi-clause description naming every object with its size and position (about 25-65 tokens)."""
    total = len(scene["objects"])
    parts = []
    for c, s, n in groups(scene):
        mine = [o for o in scene["objects"] if o[:2] == [c, s]]
        size = "" if mine[0][3] == "medium" else mine[0][3] + " "
        parts.append(f"{_a(size or c)} {size}{c} {s} {POS_PHRASE[mine[0][2]]}" if n == 1 else
                     f"{NUM[n]} {c} {s}s ({', '.join(o[2] for o in mine)})")
    out = [f"This {rng.choice(('picture', 'image', 'drawing', 'illustration'))} shows {NUM[total]} "
           f"{_pl('shape', total)} on a plain {scene['bg']} background.", f"It contains {_join(parts)}."]
    if scene["text"]:
        out.append(f"{_cap(_text_phrase(scene))} is written in {scene['text'][1]} at the {scene['text'][2]}.")
    return " ".join(out + ([rng.choice(FILLERS)] if rng.random() < 0.5 else []))


def caption(rng, scene):
    """A web-style caption, from alt-text fragments ('two red stars') to long descriptions. Every form names all
    colours, shapes and counts, and most name the word, so that a caption is informative of its image."""
    gs, bg, t = groups(scene), scene["bg"], scene["text"]
    g, total = _join([f"{_a(c) if n == 1 else NUM[n]} {c} {_pl(s, n)}" for c, s, n in gs]), len(scene["objects"])
    wt = f" and {_text_phrase(scene)}" if t else ""
    k = rng.choices(range(8), (12, 12, 10, 10, 10, 8, 8, 30))[0]
    if k == 0:
        return g + wt + rng.choice(("", ".", rng.choice(SUFFIXES)))
    if k == 1:
        where = rng.choice(("", f" on a {bg} background", f" against a {bg} background", f", {bg} background"))
        if rng.random() < 0.4:
            return f"{rng.choice(PREFIXES)} {g}{where}{wt}{rng.choice(SUFFIXES)}"
        noun = rng.choice(("A picture", "An image", "A drawing", "A simple drawing", "Clip art", "An illustration"))
        return f"{noun} of {g}{where}{wt}."
    if k == 2:
        tail = f" {'Above' if t[2] == 'top' else 'Below'} {'it' if total == 1 else 'them'} is {_text_phrase(scene)}." \
            if t else ""
        return _cap(f"{g} {'is' if total == 1 else 'are'} drawn on a plain {bg} background.") + tail
    if k == 3:
        return ", ".join(f"{n} {c} {_pl(s, n)}" for c, s, n in gs) + f" | {bg} background" + \
            (f" | text: {t[0]}" if t else "")
    if k == 4:
        return f"There {'is' if gs[0][2] == 1 else 'are'} {g} on a {bg} background{wt}."
    if k == 5 and t:
        return f'A sign that says "{t[0]}", with {g} next to it.'
    if k in (5, 6):
        return f"{_cap(NUM[total])} {_pl('shape', total)} in total: {g}{wt}."
    return long_caption(rng, scene)


QA_KINDS = ("color", "shape", "count", "total", "position", "side", "text", "exist", "background")
LETTERS = "ABCD"  # multiple-choice options


def qa(rng, scene, kind):
    """One question about the scene: (question, short answer, sentence answer, wrong options for multiple choice),
    or None when this scene cannot answer this kind of question unambiguously."""
    gs, t = groups(scene), scene["text"]
    key = 1 if kind == "color" else 0  # "color" asks about a shape drawn in one colour only, "shape" the reverse
    unique = [g for g in gs if sum(h[key] == g[key] for h in gs) == 1]
    singles = [o for o in scene["objects"] if (o[0], o[1], 1) in gs]  # objects alone of their kind
    sides = [o for o in singles if o[2].endswith(("left", "right"))]
    if kind == "color" and unique:
        c, s, n = rng.choice(unique)
        return (f"What color {'is' if n == 1 else 'are'} the {_pl(s, n)}?", c,
                f"The {s} is {c}." if n == 1 else f"They are {c}.", [x for x in COLORS if x != c])
    if kind == "shape" and unique:
        c, s, n = rng.choice(unique)
        return (f"What shape {'is' if n == 1 else 'are'} the {c} {_pl('object', n)}?", s,
                f"It is {_a(s)} {s}." if n == 1 else f"They are {s}s.", [x for x in SHAPES if x != s])
    if kind in ("count", "total"):
        c, s, n = rng.choice(gs) if kind == "count" else ("", "shape", len(scene["objects"]))
        return (f"How many {f'{c} {s}s' if c else 'shapes'} are there{'' if c else ' in the image'}?", str(n),
                f"There {'is' if n == 1 else 'are'} {NUM[n]} {c + ' ' if c else ''}{_pl(s, n)}.",
                [str(k) for k in range(max(1, n - 3), max(5, n + 4)) if k != n])
    if kind == "position" and singles:
        c, s, pos = rng.choice(singles)[:3]
        return f"Where is the {c} {s}?", pos, f"It is {POS_PHRASE[pos]}.", [p for p in POSITIONS if p != pos]
    if kind == "side" and sides:  # two options only, as some MMBench questions have
        c, s, pos = rng.choice(sides)[:3]
        side, other = ("left", "right") if pos.endswith("left") else ("right", "left")
        return (f"Is the {c} {s} on the left or on the right side of the image?", side,
                f"It is on the {side} side.", [other])
    if kind == "text" and t and t[0].isdigit():
        return ("What number is written in the image?", t[0], f"The number {t[0]} is written in the image.",
                [str(k) for k in rng.sample(range(1000), 4) if str(k) != t[0]][:3])
    if kind == "text" and t:
        case = str.upper if t[0].isupper() else str.lower  # distractors in the answer's case, or case gives it away
        q = rng.choice(("What word is written in the image?", "What does the text say?", "What is written here?"))
        return q, t[0], f'It says "{t[0]}".', [case(x) for x in WORDS if x != t[0].lower()]
    if kind == "exist":  # balanced yes/no, as POPE asks
        present = [g[:2] for g in gs]
        yes = rng.random() < 0.5
        c, s = rng.choice(present if yes else [k for k in KINDS[scene["bg"]] if k not in present])
        return (f"Is there {_a(c)} {c} {s} in the image?", "Yes" if yes else "No",
                f"Yes, there is {_a(c)} {c} {s}." if yes else f"No, there is no {c} {s}.", ["No" if yes else "Yes"])
    if kind == "background":
        bg = scene["bg"]
        return "What color is the background?", bg, f"The background is {bg}.", [x for x in BACKGROUNDS if x != bg]
    return None


def multiple_choice(rng, answer, others):
    """MMBench-style options: the answer and up to three distractors, shuffled. Returns (options, answer letter)."""
    opts = [answer] + rng.sample(others, min(3, len(others)))
    rng.shuffle(opts)
    return opts, LETTERS[opts.index(answer)]


TWO_IMAGES = ("the first image", "the second image")  # MUIRBench-style options of the two-image questions


def two_image_qa(rng, split):
    """Two scenes of partition `split` and a question that needs both: (scenes, question, answer letter, kind)."""
    while True:
        a, b = sample_scene(rng, split), sample_scene(rng, split)
        if rng.random() < 0.5:
            if len(a["objects"]) != len(b["objects"]):
                return [a, b], "Which image shows more shapes?", "AB"[len(b["objects"]) > len(a["objects"])], "counting"
        else:
            kinds = [{g[:2] for g in groups(x)} for x in (a, b)]
            if only := sorted(kinds[0] ^ kinds[1]):
                c, s = rng.choice(only)
                return [a, b], f"Which image shows {_a(c)} {c} {s}?", "AB"[(c, s) in kinds[1]], "existence"


def two_image_question(q):
    return f"Image 1: <image>\nImage 2: <image>\n{q}"


def conversation(rng, scene):
    """1-4 (question, answer) turns about one image: descriptions, and questions answered in one of three styles:
    a sentence, a single word or phrase (as VQA evals ask), or an option letter (as MMBench asks). Without a scene:
    one of the few text-only conversations that LLaVA-665k has, small facts about the world's vocabulary."""
    if scene is None:
        k = rng.randrange(3)
        if k == 0:
            s, n = rng.choice((("triangle", 3), ("square", 4), ("diamond", 4), ("star", 5)))
            return [(f"How many points does {_a(s)} {s} have?", f"{_cap(_a(s))} {s} has {NUM[n]} points.")]
        if k == 1:
            a, b = rng.randrange(10), rng.randrange(10)
            return [(f"What is {a} plus {b}?", str(a + b))]
        w = rng.choice(WORDS)
        return [(f'Spell the word "{w}".', "-".join(w.upper())), ("How many letters does it have?", _cap(NUM[len(w)]))]
    turns = []
    for t in range(rng.choices((1, 2, 3, 4), (50, 25, 15, 10))[0]):
        if t == 0 and rng.random() < 0.2:
            turns.append(("Describe the image.", long_caption(rng, scene)) if rng.random() < 0.5 else
                         ("Write a short caption for this image.", _cap(caption(rng, scene))))
            continue
        got = None
        while got is None:
            got = qa(rng, scene, rng.choice(QA_KINDS))
        q, short, sentence, others = got
        if any(q in x for x, _ in turns):
            continue
        style = rng.choices(("sentence", "short", "mc"), (40, 40, 20))[0]
        if style == "mc" and short not in ("Yes", "No"):  # LLaVA's option prompt, or VLMEvalKit's MMBench one
            opts, letter = multiple_choice(rng, short, others)
            listed = "".join(f"\n{LETTERS[k]}. {o}" for k, o in enumerate(opts))
            turns.append((q + listed + "\nAnswer with the option's letter from the given choices directly." if
                          rng.random() < 0.5 else f"Question: {q}\nOptions:{listed}\nPlease select the correct answer "
                          "from the options above. \n", letter))
        else:
            turns.append((q + "\nAnswer the question using a single word or phrase.", short) if style == "short"
                         else (q, sentence))
    return turns


# -----------------------------------------------------------------------------------------------------------------
# Tokenizer: shaped like Qwen2.5's tokenizer.json, so that the toy pipeline runs the real tokenizer code path.

QWEN_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"""
                r"""\s*[\r\n]+|\s+(?!\S)|\s+""")
# Qwen2.5's 22 added tokens in id order (151643..151664) with Qwen's own "special" flags, then the paper's two.
QWEN_ADDED = [(t, True) for t in "<|endoftext|> <|im_start|> <|im_end|> <|object_ref_start|> <|object_ref_end|> "
              "<|box_start|> <|box_end|> <|quad_start|> <|quad_end|> <|vision_start|> <|vision_end|> <|vision_pad|> "
              "<|image_pad|> <|video_pad|>".split()] + [(t, False) for t in "<tool_call> </tool_call> <|fim_prefix|> "
              "<|fim_middle|> <|fim_suffix|> <|fim_pad|> <|repo_name|> <|file_sep|>".split()]
PAPER_ADDED = Tokenizer.ADDED  # <|endofchunk|> and <s>, as model.Tokenizer expects them


def train_tokenizer(texts, vocab_size):
    """Byte-level BPE trained on `texts` without special tokens; then the added tokens appended in Qwen2.5's order,
    so that they follow the BPE vocabulary as Qwen's follow its 151643 merges and bytes."""
    import tokenizers as tk
    from tokenizers import pre_tokenizers as pre

    tok = tk.Tokenizer(tk.models.BPE())
    tok.normalizer = tk.normalizers.NFC()
    tok.pre_tokenizer = pre.Sequence([pre.Split(tk.Regex(QWEN_PATTERN), behavior="isolated", invert=False),
                                      pre.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = tk.decoders.ByteLevel()
    tok.post_processor = tk.processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(texts, tk.trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[],
                                                          initial_alphabet=pre.ByteLevel.alphabet(),
                                                          show_progress=False))
    tok.add_tokens([tk.AddedToken(t, special=special, normalized=False)  # ids in list order
                    for t, special in QWEN_ADDED + [(t, True) for t in PAPER_ADDED]])
    return tok


# -----------------------------------------------------------------------------------------------------------------
# Writers. Each one writes its part of the world under `root`, and adds its counts and scenes to the manifest.


def _put(root, name, data):
    with open(os.path.join(root, name), "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)


def pool_noise(seed, n_pool, wrong_share):
    """Which pool records are broken ({index: kind}; 1-3 of each kind) and which have a wrong caption (indices)."""
    per_kind, n_wrong = max(1, min(3, n_pool // 2000)), round(wrong_share * n_pool)
    n_broken = per_kind * len(BROKEN_KINDS)
    if n_pool < n_broken + n_wrong + 1:
        raise ValueError(f"toyworld: n_pool={n_pool} is too small for {n_broken} broken records and {n_wrong} "
                         f"wrong captions")
    pick = random.Random(f"{seed}:pool:noise").sample(range(n_pool), n_broken + n_wrong)
    return {i: BROKEN_KINDS[k // per_kind] for k, i in enumerate(pick[:n_broken])}, set(pick[n_broken:])


def pool_record(seed, i, broken_kind=None, wrong=False):
    """Scene and caption of pool record i. A wrong caption describes another scene sharing no kind with this one."""
    rng = random.Random(f"{seed}:pool:{i}")
    scene = sample_scene(rng, "train", bg="white" if broken_kind == "png_alpha" else None)  # alpha shows as white
    cap = caption(rng, scene)
    if wrong:
        kinds, other = {g[:2] for g in groups(scene)}, sample_scene(rng, "train")
        while kinds & {g[:2] for g in groups(other)}:
            other = sample_scene(rng, "train")
        cap = caption(rng, other)
    elif broken_kind == "huge_caption":  # a web page that pastes a whole article: over 5000 words, hence over 5000
        cap = long_caption(rng, scene)  # tokens under a Qwen-style pre-tokenizer, which never joins two words
        while len(cap.split()) < 5000:
            cap += " " + long_caption(rng, scene)
    return scene, "" if broken_kind == "empty_caption" else cap


def _write_pool(root, cfg, man):
    seed, n, size, shard_size = cfg["seed"], cfg["n_pool"], cfg["image_size"], cfg["shard_size"]
    broken, wrong = pool_noise(seed, n, cfg["wrong_share"])
    width = max(4, len(str(shard_size - 1)))  # img2dataset's keys: 5-digit shard number + index in the shard
    truth = man["pool"] = {"samples": n, "shards": -(-n // shard_size), "wrong_caption": [],
                           "broken": {k: [] for k in BROKEN_KINDS}}
    texts, members = [], []
    for i in range(n):
        kind = broken.get(i)
        scene, cap = pool_record(seed, i, kind, i in wrong)
        key = f"{i // shard_size:05d}{i % shard_size:0{width}d}"
        man["scenes"]["pool"][key] = scene
        if kind or i in wrong:
            (truth["broken"][kind] if kind else truth["wrong_caption"]).append(key)
        # the image: a JPEG, or the broken variant that `kind` names (a truncated JPEG's header still parses)
        img = render(scene, size, rgba=kind == "png_alpha")
        data = encode(img.convert("CMYK") if kind == "cmyk_jpeg" else img, "PNG" if kind == "png_alpha" else "JPEG")
        data = b"" if kind == "zero_byte_image" else data[:len(data) // 2] if kind == "truncated_jpeg" else data
        uid = hashlib.md5(f"toyworld:{seed}:{key}".encode()).hexdigest()  # 128-bit hex, like DataComp's uid
        members += [(f"{key}.{'png' if kind == 'png_alpha' else 'jpg'}", data),
                    (f"{key}.json", json.dumps({"key": key, "uid": uid, "status": "success", "width": size,
                                                "height": size}).encode())]
        if kind != "missing_txt":
            members.append((f"{key}.txt", cap.encode()))
        if kind != "huge_caption":
            texts.append(cap)
        if i % shard_size == shard_size - 1 or i == n - 1:
            name = f"pool/{i // shard_size:06d}.tar"
            _put(root, name, b"".join(tar_member(*m) for m in members) + bytes(1024))  # 2 zero blocks end a tar
            man["files"][name], members = {"samples": i % shard_size + 1}, []
    return texts


def _write_sft(root, cfg, man):
    seed, n, size, ts = cfg["seed"], cfg["n_sft"], cfg["image_size"], cfg["text_size"]
    text_only = set(random.Random(f"{seed}:sft:text-only").sample(range(n), max(1, round(0.02 * n)) if n else 0))
    others = [i for i in range(n) if i not in text_only]  # 5% ask about two images, as MUIRBench does
    two = set(random.Random(f"{seed}:sft:two-images").sample(others, min(len(others), round(0.05 * n))))
    convs, texts = [], []
    for i in range(n):
        rng, cid = random.Random(f"{seed}:sft:{i}"), f"{i:06d}"
        if i in two:
            scenes, q, letter, _ = two_image_qa(rng, "train")
            images = [f"images/{cid}_{k}.jpg" for k in range(2)]
            for k, (sc, im) in enumerate(zip(scenes, images)):
                man["scenes"]["sft"][f"{cid}_{k}"] = sc
                _put(root, f"sft/{im}", encode(render(sc, size, text_size=ts)))
            q, a = (two_image_question(q), f"{_cap(TWO_IMAGES['AB'.index(letter)])}.") if rng.random() < 0.5 else \
                (two_image_question(q) + "".join(f"\n{LETTERS[k]}. {o}" for k, o in enumerate(TWO_IMAGES)) +
                 "\nAnswer with the option's letter from the given choices directly.", letter)
            convs.append({"id": cid, "image": images, "conversations": [{"from": "human", "value": q},
                                                                        {"from": "gpt", "value": a}]})
            texts += [q.replace("<image>", ""), a]
            continue
        scene = None if i in text_only else sample_scene(rng, "train")
        turns, image = conversation(rng, scene), f"images/{cid}.jpg" if scene else None
        if scene:
            man["scenes"]["sft"][cid] = scene
            _put(root, f"sft/{image}", encode(render(scene, size, text_size=ts)))
        conv = []
        for k, (q, a) in enumerate(turns):
            if k == 0 and image:  # LLaVA data puts the image before or after the first question
                q = f"<image>\n{q}" if rng.random() < 0.8 else f"{q}\n<image>"
            conv += [{"from": "human", "value": q}, {"from": "gpt", "value": a}]
            texts += [q.replace("<image>", ""), a]
        convs.append({"id": cid, **({"image": image} if image else {}), "conversations": conv})
    _put(root, "sft/sft.json", "[\n" + ",\n".join(json.dumps(c) for c in convs) + "\n]\n")  # a conversation a line
    man["files"]["sft/sft.json"] = {"conversations": n, "with_image": n - len(text_only), "text_only": len(text_only),
                                    "multi_turn": sum(len(c["conversations"]) > 2 for c in convs),
                                    "two_images": len(two)}
    man["files"]["sft/images"] = {"files": n - len(text_only) + len(two)}
    return texts


MMBENCH = {"color_recognition": "color", "shape_recognition": "shape", "object_counting": "count",
           "object_localization": "position", "spatial_relationship": "side", "ocr": "text"}  # category -> qa kind


def _tsv(header, rows) -> str:
    """A TSV as VLMEvalKit writes its own (every field quoted)."""
    buf = io.StringIO()
    csv.writer(buf, delimiter="\t", quoting=csv.QUOTE_ALL, lineterminator="\n").writerows([header] + rows)
    return buf.getvalue()


def _write_eval(root, cfg, man):
    """Eval sets in VLMEvalKit's TSV layout (formats.md §1), each on its own scenes from the held-out partition.
    Images are base64 JPEGs; a row that shows the image of an earlier row holds that row's index instead (a
    back-reference, as VLMEvalKit's own files do)."""
    seed, n, size, scenes = cfg["seed"], cfg["n_eval"], cfg["image_size"], man["scenes"]["eval"]

    def b64(scene):
        return base64.b64encode(encode(render(scene, size, text_size=cfg["text_size"]))).decode()

    # MMBench_DEV_EN: circular evaluation as in MMBench's own TSV: the copy of question g with its options rotated k
    # places has index g + k * 1_000_000 and refers back to row g's image.
    rng, rows = random.Random(f"{seed}:eval:mmbench"), []
    for g in range(n):
        cat, got = list(MMBENCH)[g % len(MMBENCH)], None
        while got is None:
            scene = sample_scene(rng, "eval", text=True if cat == "ocr" else None)
            got = qa(rng, scene, MMBENCH[cat])
        scenes[f"mmbench/{g}"] = scene
        opts, letter = multiple_choice(rng, got[1], got[3])
        img = b64(scene)
        rows += [[g + k * 1_000_000, got[0], "", *opts[k:], *opts[:k], *[""] * (4 - len(opts)),
                  LETTERS[(LETTERS.index(letter) - k) % len(opts)], cat, img if k == 0 else str(g), "dev"]
                 for k in range(len(opts))]
    header = ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "split"]
    _put(root, "eval/MMBench_DEV_EN.tsv", _tsv(header, sorted(rows)))  # the originals first, then each rotation
    man["files"]["eval/MMBench_DEV_EN.tsv"] = {"questions": n, "rows": len(rows)}

    # POPE: per image, a yes and a no question for each of POPE's three ways to pick absent objects. Toy versions:
    # random = any absent kind; popular = an absent kind sharing the colour or the shape of an object in the image;
    # adversarial = attributes swapped between two objects (red circle + blue star -> "blue circle?"). A question
    # drawn for several ways is one row whose category lists them, comma-joined, as in VLMEvalKit's POPE.tsv.
    rng, pope, n_img, n_q = random.Random(f"{seed}:eval:pope"), {}, 0, 0
    while n_q < n:
        scene, n_img, first = sample_scene(rng, "eval", min_kinds=2), n_img + 1, len(pope)
        scenes[f"pope/{first}"], img = scene, b64(scene)  # keyed by the row that holds the image
        present = [g[:2] for g in groups(scene)]
        absent = [k for k in KINDS[scene["bg"]] if k not in present]
        near = [k for k in absent if any(k[0] == p[0] or k[1] == p[1] for p in present)]
        swap = [k for k in near if any(k[0] == p[0] for p in present) and any(k[1] == p[1] for p in present)]
        for cat, negatives in (("random", absent), ("popular", near), ("adversarial", swap or near)):
            pair = [(rng.choice(present), "Yes"), (rng.choice(negatives), "No")]
            rng.shuffle(pair)
            for (c, s), ans in pair[:n - n_q]:
                q, n_q = f"Is there {_a(c)} {c} {s} in the image?", n_q + 1
                pope.setdefault((first, q), [len(pope), q, ans, [], img if len(pope) == first else str(first)])[3] \
                    .append(cat)
    rows = [[i, q, ans, ",".join(cats), img] for i, q, ans, cats, img in pope.values()]
    _put(root, "eval/POPE.tsv", _tsv(["index", "question", "answer", "category", "image"], rows))
    man["files"]["eval/POPE.tsv"] = {"questions": n, "rows": len(rows), "images": n_img,
                                     "yes": sum(len(r[3].split(",")) for r in rows if r[2] == "Yes"),
                                     "no": sum(len(r[3].split(",")) for r in rows if r[2] == "No")}

    # TextVQA_VAL: one question per image with a word or number, and 10 human answers (a list literal) that mostly
    # agree, so that the soft VQA accuracy, min(1, matches / 3), has something to average.
    rng, rows = random.Random(f"{seed}:eval:textvqa"), []
    for i in range(n):
        scene = scenes[f"textvqa/{i}"] = sample_scene(rng, "eval", text=True)
        q, w = qa(rng, scene, "text")[:2]
        answers = [w] * 10
        for k in rng.sample(range(10), rng.choices((0, 1, 2, 3), (50, 25, 15, 10))[0]):
            answers[k] = rng.choice((w.lower(), w.capitalize(), f"{w} sign", w[:-1] or w, "unanswerable"))
        rows.append([i, b64(scene), q, repr(answers)])
    _put(root, "eval/TextVQA_VAL.tsv", _tsv(["index", "image", "question", "answer"], rows))
    man["files"]["eval/TextVQA_VAL.tsv"] = {"questions": n}

    # MUIRBench: multiple-choice questions that need two images (which shows more shapes, which shows a kind), the
    # images a list literal, placed at the question's "<image>" placeholders.
    rng, rows = random.Random(f"{seed}:eval:muirbench"), []
    for i in range(n):
        pair, q, letter, kind = two_image_qa(rng, "eval")
        scenes[f"muirbench/{i}/0"], scenes[f"muirbench/{i}/1"] = pair
        rows.append([i, two_image_question(q), *TWO_IMAGES, letter, kind, repr([b64(x) for x in pair])])
    _put(root, "eval/MUIRBench.tsv", _tsv(["index", "question", "A", "B", "answer", "category", "image"], rows))
    man["files"]["eval/MUIRBench.tsv"] = {"questions": n}


# -----------------------------------------------------------------------------------------------------------------
# Build, cache, command line


def _manifest_text(man):
    """Indented JSON, except that each scene takes one line (there are tens of thousands)."""
    blocks = [f'    "{split}": {{' + ",".join(f"\n      {json.dumps(k)}: {json.dumps(v, separators=(',', ':'))}"
                                           for k, v in d.items()) + "\n    }" for split, d in man["scenes"].items()]
    head = json.dumps({k: v for k, v in man.items() if k != "scenes"}, indent=2)
    return head[:-2] + ',\n  "scenes": {\n' + ",\n".join(blocks) + "\n  }\n}\n"


def _manifest_config(root):
    try:
        with open(os.path.join(root, "manifest.json")) as f:
            m = json.load(f)
        return m.get("version"), {"text_size": 0.0, **(m.get("config") or {})}  # worlds from before text_size
    except (OSError, ValueError):
        return None


def build(out_dir, **settings) -> dict:
    """Write a toy world with `settings` (DEFAULTS' keys, Config's defaults) into out_dir and return its manifest. It
    is written into a temp dir next to out_dir and renamed at the end, so an interrupted build never looks finished.
    An existing toy world at out_dir is replaced; any other non-empty directory is refused."""
    cfg = {**DEFAULTS, **settings}
    counts = ("n_pool", "shard_size", "n_sft", "n_eval")  # the first two at least 1, the others at least 0
    if set(cfg) != set(DEFAULTS) or not all(isinstance(cfg[k], int) and cfg[k] >= (k in counts[:2]) for k in counts) \
            or not (32 <= cfg["image_size"] <= 4096 and 0 <= cfg["wrong_share"] < 1 and 0 <= cfg["text_size"] < 0.5):
        raise ValueError(f"toyworld: bad settings {settings}: need n_pool, shard_size >= 1 and n_sft, n_eval >= 0 "
                         f"(integers), 32 <= image_size <= 4096, 0 <= wrong_share < 1, 0 <= text_size < 0.5")
    out_dir = os.path.abspath(out_dir)
    if os.path.isdir(out_dir) and os.listdir(out_dir) and _manifest_config(out_dir) is None:
        raise FileExistsError(f"toyworld: {out_dir} exists and is not a toy world (no manifest.json); not replacing it")
    tmp, old = f"{out_dir}.tmp-{os.getpid()}", f"{out_dir}.old-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        for d in ("pool", "sft/images", "eval"):
            os.makedirs(os.path.join(tmp, d))
        man = {"name": "toyworld", "version": VERSION, "config": cfg, "files": {}, "pool": {},
               "scenes": {"pool": {}, "sft": {}, "eval": {}}}
        texts = _write_pool(tmp, cfg, man) + _write_sft(tmp, cfg, man)
        _write_eval(tmp, cfg, man)  # eval text does not train the tokenizer either
        tok = train_tokenizer(texts + [f"system\n{SYSTEM_PROMPT}\nuser\nassistant\n"], VOCAB_SIZE)
        tok.save(os.path.join(tmp, "tokenizer.json"))
        man["files"]["tokenizer.json"] = {"vocab_size": tok.get_vocab_size(with_added_tokens=True),
                                          "bpe_vocab_size": tok.get_vocab_size(with_added_tokens=False)}
        _put(tmp, "manifest.json", _manifest_text(man))  # last: a dir with a manifest is complete
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if os.path.exists(out_dir):
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return man


def default_root() -> str:
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "cache", "toyworld")


def ensure(root=None, **settings) -> str:
    """The world dir, built on first use, and rebuilt if it was built with other settings or by an older generator.
    In a multi-process job call it on one rank first, and let the others wait at a barrier."""
    root = os.path.abspath(root or default_root())
    if _manifest_config(root) != (VERSION, {**DEFAULTS, **settings}):
        print(f"toyworld: building the toy world into {root}", file=sys.stderr)
        build(root, **settings)
    return root


def write_samples(out, seed=0, image_size=64, n_pool=20000, wrong_share=0.1):
    """PNGs of two clean pool records (the first with a word, then the first with several kinds); prints captions."""
    broken, wrong = pool_noise(seed, n_pool, wrong_share)
    records = ((i, *pool_record(seed, i)) for i in range(n_pool) if i not in broken and i not in wrong)
    os.makedirs(out, exist_ok=True)
    for k, want in enumerate((lambda s: s["text"], lambda s: not s["text"] and len(groups(s)) > 1), 1):
        i, scene, cap = next(r for r in records if want(r[1]))
        render(scene, image_size).save(path := os.path.join(out, f"toyworld_sample_{k}.png"), optimize=True)
        print(f"{path}: pool record {i} (seed {seed}): {cap}")


def main():
    cfg = parse_config(Config)
    if cfg.samples:
        return write_samples(cfg.samples, cfg.seed, cfg.image_size, cfg.n_pool, cfg.wrong_share)
    t0, out = time.time(), cfg.out or default_root()
    man = build(out, **{k: getattr(cfg, k) for k in DEFAULTS})
    p, vocab = man["pool"], man["files"]["tokenizer.json"]["vocab_size"]
    print(f"toyworld: wrote {out} in {time.time() - t0:.1f}s: {p['samples']} pool pairs in {p['shards']} shards "
          f"({len(p['wrong_caption'])} wrong captions, {sum(map(len, p['broken'].values()))} broken records), "
          f"{cfg.n_sft} SFT conversations, {cfg.n_eval} questions per eval set, vocab {vocab}")


if __name__ == "__main__":
    main()
