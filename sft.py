"""
Visual instruction tuning (reference.md §1.4, §3): the pre-trained projector and Qwen2 are tuned on LLaVA-format
conversations at full resolution (no pooling: 729 tokens per image at the paper's shapes), on train.py's own loop.

    python train.py && python sft.py                      # toy world: sft/sft.json, from runs/pretrain/final
    python sft.py --preset paper --init runs/paper/final --data llava_v1_5_mix665k.json --image-root /data/llava \\
        --prepare-only                                    # once, before a multi-process run
    torchrun --nproc_per_node=8 sft.py --preset paper --init runs/paper/final --data ... --image-root /data/llava

Preparation turns every conversation into one document of pack.py's row format (KEY.labels.npy holds its targets:
IGNORE except the assistant replies and their end markers) and packs them into --seq-len rows that train.py trains
with the document mask, so a packed step computes exactly what the conversations would compute alone. --no-pack
writes one conversation per row, in length groups, padded to the batch's longest row: the official layout.
--max-tiles N: NVLM's tiles (model.tile_image), stored as PNG, each after its text tag, of --tile-tokens tokens.

Sources are read in order and cut into shards of --shard-size conversations; each shard is checked, tokenized and
packed by one worker, written atomically, and skipped by a rerun. The prepared dir is keyed by everything its bytes
depend on; a different key is refused. Broken conversations are skipped and counted by reason, with the first ids:
conversations_in == used + sum(skipped).
"""
from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import re
import sys
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch.distributed as dist
from PIL import Image

import model as M
import pack
import toyworld
import train
import weights as W


@dataclass
class Config(train.Config):
    preset: str = "tiny"  # tiny (toy world) | paper; a preset fills the fields below, explicit flags win
    data: list[str] = field(default_factory=list)  # SRC[:REPEAT] ...: LLaVA .json or .jsonl; none: the toy world's
    image_root: str = ""  # image paths are relative to it; "" = each source's own directory
    init: str = "runs/pretrain/final"  # the pre-trained VLM (train.py's OUT/final, or any checkpoint the loader takes)
    out: str = "runs/sft"
    prepared: str = ""  # prepared rows; "" = OUT-prepared, beside --out
    prepare_only: bool = False  # prepare the rows and exit (a multi-node run prepares once, before training)
    chat_style: str = "qwen2"  # qwen2 (the standard template) | release (the released checkpoint's; one image)
    system: str = ""  # the default system prompt ("" = model.SYSTEM_PROMPT); a leading system turn replaces it
    text_share: float = 0.0  # NVLM's recipe: repeat text-only conversations to this share of the mix; 0 = as given
    pack: bool = True  # False: one conversation per row, length-grouped batches padded to their longest row
    image_tokens: int = 0  # 0 = the --init's full patch grid (patches per side squared): low-to-high, §1.4
    max_tiles: int = 1  # NVLM's dynamic high resolution: an image -> up to N tiles + a thumbnail, tagged; 1 = a squash
    tile_tokens: int = 0  # with --max-tiles > 1: tokens per tile (a square: the pooled grid); 0 = --image-tokens
    seq_len: int = 512
    lr: float = 1e-3
    weight_decay: float = 0.1
    shard_size: int = 4096  # conversations per prepared shard
    prep_workers: int = 0  # preparation processes; 0 = all cores

    def __post_init__(self):  # defaults that depend on other flags
        self.data = self.data or [os.path.join(toyworld.default_root(), "sft", "sft.json")]
        self.prepared = self.prepared or self.out.rstrip("/") + "-prepared"
        self.tile_size, patch = tower(self.init, self.preset)  # not a flag: the tiles are the tower's size
        tiled = self.max_tiles > 1 and self.tile_tokens
        self.image_tokens = tiled or self.image_tokens or (self.tile_size // patch) ** 2

    def final_meta(self) -> dict:  # eval and export use the format training used
        return {"chat_style": self.chat_style, "system_prompt": self.system or M.SYSTEM_PROMPT,
                "max_tiles": self.max_tiles}


# paper: about the official 128 conversations a step at LLaVA-665k's lengths: on a LLaVA-665k-like set (bench/sft.py,
# 729 + ~300 tokens a conversation) a packed 4096-token row holds 3.74 conversations, so 32 rows hold ~120
PRESETS = {"tiny": dict(steps=200, global_batch=8, lr=3e-3, attention="mask"),  # 55% of the toy SFT rows
           "paper": dict(seq_len=4096, global_batch=32, micro_batch=1, lr=2e-5, weight_decay=0.1,
                                     warmup=0.03, ac=True, init="")}
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant"}
GROUP = 128  # --no-pack: conversations sorted by length within consecutive groups of this many (the official gbs)


def tower(init: str, preset: str) -> tuple[int, int]:
    """(image size, patch size) of the --init's tower (our config.json or transformers'), else of the preset's."""
    try:
        with open(os.path.join(init, "config.json")) as f:
            c = json.load(f)
        v = c.get("vision") or c.get("vision_config") or {}
        return v["image_size"], v["patch_size"]
    except (OSError, ValueError, KeyError, TypeError):
        v = M.preset(preset).vision
        return v.image_size, v.patch_size


# -----------------------------------------------------------------------------------------------------------------
# Sources


def parse_sources(cfg: Config) -> list[tuple[str, float, str]]:
    """--data entries -> (path, repeat, image root)."""
    out = []
    for s in cfg.data:
        path, sep, r = s.rpartition(":")
        path, r = (path, float(r)) if sep and re.fullmatch(r"\d*\.?\d+", r) else (s, 1.0)
        if not os.path.isfile(path):
            raise SystemExit(f"sft: no source file {path!r}")
        out.append((os.path.abspath(path), r, os.path.abspath(cfg.image_root or os.path.dirname(path))))
    return out


def read_source(path: str):
    """(index, record) for each conversation: a JSON list, or JSON Lines read as a stream (a malformed line gives
    record None). A file that is neither is an error naming it."""
    with open(path) as f:
        head = f.read(4096).lstrip()
        f.seek(0)
        if head.startswith("["):
            try:
                data = json.load(f)
            except ValueError as e:
                raise SystemExit(f"sft: {path}: not valid JSON ({e})") from None
            if not isinstance(data, list):
                raise SystemExit(f"sft: {path}: a JSON source is a list of conversations, not {type(data).__name__}")
            yield from enumerate(data)
            return
        for i, line in enumerate(f):
            if line.strip():
                try:
                    yield i, json.loads(line)
                except ValueError:
                    yield i, None


def survey(cfg: Config, sources) -> tuple[int, list[tuple[float, float]]]:
    """A first pass: the number of records (for the ETA) and, per source, the repeat of a conversation with images
    and of a text-only one. --text-share scales the latter so that text-only copies are that share of the mix."""
    n, records = Counter(), 0
    for path, r, _ in sources:
        for _, rec in read_source(path):
            n[isinstance(rec, dict) and not rec.get("image")] += r
            records += 1
    if cfg.text_share and not n[True]:
        raise SystemExit("sft: --text-share needs text-only conversations in the sources")
    k = cfg.text_share / (1 - cfg.text_share) * n[False] / n[True] if cfg.text_share else 1.0
    return records, [(r, r * k) for _, r, _ in sources]


def copies(seed: int, src: int, i: int, r: float) -> int:
    """floor(r) copies, plus one with probability frac(r), drawn from a hash of (seed, source, index): the same
    conversation gets the same count however the sources are sharded."""
    h = int.from_bytes(hashlib.blake2b(f"{seed}:{src}:{i}".encode(), digest_size=8).digest(), "little")
    return int(r) + (h / 2**64 < r - int(r))


# -----------------------------------------------------------------------------------------------------------------
# One conversation -> a document, or the reason it is skipped


def check(rec, style: str, root: str):
    """(system, turns, images as (ext, bytes), dropped trailing user turns) or a skip reason."""
    if not isinstance(rec, dict):
        return "bad_json_line" if rec is None else "bad_record"
    turns, image = rec.get("conversations"), rec.get("image")
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        return "bad_record"
    if not all(isinstance(t.get("value"), str) for t in turns):
        return "non_string_value"
    if not all(t["value"].strip() for t in turns):
        return "empty_value"
    system = turns[0]["value"].strip() if turns and turns[0].get("from") == "system" else None
    turns = [{"from": t.get("from"), "value": t["value"]} for t in turns[system is not None:]]
    if any(t["from"] not in ROLES and t["from"] != "system" for t in turns):
        return "bad_role"
    if any(t["from"] == "system" or ROLES[t["from"]] != ("user", "assistant")[k % 2] for k, t in enumerate(turns)):
        return "roles_out_of_order"
    dropped = len(turns) % 2  # a last question without a reply: nothing to learn from it
    turns = turns[: len(turns) - dropped]
    if not turns:
        return "no_assistant_turn"
    paths = [] if image is None else [image] if isinstance(image, str) else image
    if not isinstance(paths, list) or not all(isinstance(p, str) and p for p in paths):
        return "bad_record"
    if sum(t["value"].count("<image>") for t in turns) != len(paths) or \
            (system is not None and "<image>" in system):
        return "image_tag_mismatch"
    if style == "release" and len(paths) > 1:
        return "release_needs_one_image"
    images = []
    for p in paths:
        try:
            with open(os.path.join(root, p), "rb") as f:
                data = f.read()
        except OSError:
            return "missing_image"
        ext, bad = pack.check_image(data)
        if bad:
            return bad  # empty_image, corrupt_image, huge_image, tiny_image
        images.append((ext, data))
    return system, turns, images, dropped


def fit(ids: list[int], labels: list[int], image_tokens: int, seq_len: int) -> int:
    """The longest prefix that ends with a reply (a turn boundary) and fits seq_len after image expansion; 0 if not
    even the first reply fits. Cutting only there keeps images whole and no supervised token of a dropped turn."""
    best, size = 0, 0
    for i, t in enumerate(ids):
        size += image_tokens if t == M.IMAGE_ID else 1
        if size > seq_len:
            break
        if labels[i] != M.IGNORE and (i + 1 == len(ids) or labels[i + 1] == M.IGNORE):
            best = i + 1
    return best


def conversation(rec, cfg: Config, tok: M.Tokenizer, root: str) -> pack.Doc | str:
    c = check(rec, cfg.chat_style, root)
    if isinstance(c, str):
        return c
    system, turns, images, dropped = c
    ids, labels = M.chat_tokens(tok, turns, cfg.chat_style, system if system is not None else cfg.system or None)
    if cfg.max_tiles > 1:  # each image -> its tiles after their tags, stored as PNG: eval's pixels, losslessly
        tiles = [M.tile_image(M.load_image(data), cfg.tile_size, cfg.max_tiles) for _, data in images]
        ids, labels = M.expand_tiles(tok, ids, [len(t) for t in tiles], labels)
        images = [("png", toyworld.encode(t, "PNG")) for ts in tiles for t in ts]
    n = fit(ids, labels, cfg.image_tokens, cfg.seq_len)
    if not n:
        return "too_long"
    doc = pack.Doc(str(rec.get("id", "")), None, ids[:n], images[: ids[:n].count(M.IMAGE_ID)], labels[:n])
    doc.truncated, doc.dropped = n < len(ids), dropped
    return doc


# -----------------------------------------------------------------------------------------------------------------
# Preparation: shards of conversations, one worker each


_tokenizer = functools.cache(M.Tokenizer)


def prepare_shard(job) -> dict:
    """Check, tokenize, copy and pack one shard's conversations; write NAME.tar then NAME.stats.json."""
    name, records, cfg, tok_path, sources, reps, key = job
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_image refuses those images itself
    tok, docs, skipped, first, c = _tokenizer(tok_path), [], Counter(), {}, Counter()
    for src, i, rec in records:
        d = conversation(rec, cfg, tok, sources[src][2])
        n = 0 if isinstance(d, str) else copies(cfg.seed, src, i, reps[src][not d.images])
        if isinstance(d, str) or not n:
            why = d if isinstance(d, str) else "repeat_not_drawn"
            skipped[why] += 1
            first.setdefault(why, []).append(rec.get("id", f"{sources[src][0]}:{i}") if isinstance(rec, dict)
                                             else f"{sources[src][0]}:{i}")
            continue
        c.update(used=1, truncated=d.truncated, dropped_trailing_turns=d.dropped)
        docs += [pack.Doc(d.key, [src, i, k], d.ids, d.images, d.labels) for k in range(n)]
    lengths = [len(d.ids) + (cfg.image_tokens - 1) * len(d.images) for d in docs]
    rng = random.Random(f"{cfg.seed}:{name}")
    if cfg.pack:
        rows = pack.pack_fill(lengths, cfg.seq_len)
        rng.shuffle(rows)
    else:  # the official layout: a seeded order, sorted by length within groups, so a batch pads to similar rows
        order = rng.sample(range(len(docs)), len(docs))
        rows = [[i] for g in range(0, len(order), GROUP) for i in sorted(order[g: g + GROUP], key=lambda i: -lengths[i])]
    path, offsets = pack.write_rows(cfg.prepared, name, [[docs[i] for i in row] for row in rows])
    stats = {"key": key, "conversations_in": len(records), "used": c["used"], "skipped": dict(sorted(skipped.items())),
             "first_skipped_ids": {k: v[:5] for k, v in sorted(first.items())}, "truncated": c["truncated"],
             "dropped_trailing_turns": c["dropped_trailing_turns"], "docs_out": len(docs), "rows": len(rows),
             "tokens": sum(lengths), "supervised": sum(sum(t != M.IGNORE for t in d.labels) for d in docs),
             "images": sum(len(d.images) for d in docs), "bytes": os.path.getsize(path), "row_offsets": offsets,
             "row_tokens": [sum(lengths[i] for i in row) for row in rows]}
    M.write_json(os.path.join(cfg.prepared, name + ".stats.json"), stats)
    return stats


def read_json(path: str):
    with open(path) as f:
        return json.load(f)


def cache_key(cfg: Config, tok_path: str, sources) -> dict:
    """Everything the prepared bytes depend on (image files are trusted not to change under their names)."""
    with open(tok_path, "rb") as f:
        tok_hash = hashlib.sha256(f.read()).hexdigest()
    return {"sources": [[p, os.path.getsize(p), os.stat(p).st_mtime_ns, r, root] for p, r, root in sources],
            "tokenizer_sha256": tok_hash, **{k: getattr(cfg, k) for k in (
                "seq_len", "image_tokens", "chat_style", "system", "pack", "text_share", "seed", "shard_size")},
            **({"max_tiles": cfg.max_tiles, "tile_size": cfg.tile_size} if cfg.max_tiles > 1 else {})}


def prepare_rows(cfg: Config, tok_path: str) -> dict:
    """Prepare (or reuse) cfg.prepared; returns its top-level stats."""
    sources = parse_sources(cfg)
    key, out = cache_key(cfg, tok_path, sources), cfg.prepared
    top = os.path.join(out, "stats.json")
    stats = [read_json(p) for p in sorted(glob.glob(os.path.join(glob.escape(out), "*.stats.json")))]
    if os.path.isfile(top):
        stats.append(read_json(top))
    if any(s.get("key") != key for s in stats):
        raise SystemExit(f"sft: {out} was prepared with other settings or sources than {key}; use another "
                         "--prepared or delete it")
    if os.path.isfile(top):
        print(f"sft: using the rows prepared in {out}", file=sys.stderr)
        return stats[-1]
    os.makedirs(out, exist_ok=True)
    for p in glob.glob(os.path.join(glob.escape(out), ".*.tmp")):
        os.remove(p)  # left by a killed run
    records, reps = survey(cfg, sources)
    finished = {os.path.basename(p)[:-4] for p, _ in pack.packed_shards(out)}

    def jobs():  # shards of consecutive conversations over all sources, in order; finished shards are not redone
        buf, n = [], 0
        for src, (path, _, _) in enumerate(sources):
            for i, rec in read_source(path):
                buf.append((src, i, rec))
                if len(buf) == cfg.shard_size:
                    yield from todo(f"{n:06d}", buf)
                    buf, n = [], n + 1
        if buf:
            yield from todo(f"{n:06d}", buf)

    def todo(name, buf):
        names.append(name)
        if name not in finished:
            yield name, buf, cfg, tok_path, sources, reps, key

    names, t0, convs, it = [], time.time(), 0, jobs()
    left = records - sum(s["conversations_in"] for s in stats)  # what finished shards hold is done
    workers = cfg.prep_workers or len(os.sched_getaffinity(0))
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the processes are the parallelism
    with multiprocessing.Pool(workers) if workers > 1 else nullcontext() as pool:
        while batch := list(itertools.islice(it, 2 * workers)):  # a few shards at a time: bounded memory
            for s in pool.imap_unordered(prepare_shard, batch) if pool else map(prepare_shard, batch):
                convs, dt = convs + s["conversations_in"], time.time() - t0
                print(f"sft: prepared {convs:,}/{left:,} conversations, {convs / dt:,.0f}/s, ETA "
                      f"{dt / convs * (left - convs) / 60:.1f} min", file=sys.stderr)
    shards = [read_json(os.path.join(out, n + ".stats.json")) for n in names]
    total = {k: sum(s[k] for s in shards) for k in ("conversations_in", "used", "truncated", "dropped_trailing_turns",
                                                    "docs_out", "rows", "tokens", "supervised", "images")}
    skipped, first = sum((Counter(s["skipped"]) for s in shards), Counter()), {}
    for s in shards:
        for k, v in s["first_skipped_ids"].items():
            first[k] = (first.get(k, []) + v)[:5]
    assert total["conversations_in"] == total["used"] + sum(skipped.values())  # by construction, per shard
    total.update(skipped=dict(sorted(skipped.items())), first_skipped_ids=dict(sorted(first.items())),
                 fill=total["tokens"] / (total["rows"] * cfg.seq_len) if total["rows"] else 0.0, shards=len(names),
                 seq_len=cfg.seq_len, image_tokens=cfg.image_tokens, key=key)
    M.write_json(top, total)
    print(f"sft: {total['conversations_in']:,} conversations in == {total['used']:,} used + "
          f"{sum(skipped.values()):,} skipped {dict(skipped)} (first ids: {first}); {total['truncated']:,} "
          f"truncated; {total['docs_out']:,} copies in {total['rows']:,} rows of {cfg.seq_len}, filled to "
          f"{total['fill']:.1%}, {total['supervised']:,} supervised tokens")
    return total


def prepare(cfg: Config, rank: int) -> tuple[str, str]:
    """train.py's data step for SFT: rank 0 prepares the rows (or checks the cached ones), the others wait."""
    if cfg.pack and not cfg.doc_mask:
        raise SystemExit("sft: packing needs the document mask (conversations would attend to each other); "
                         "use --no-pack for plain causal rows")
    if cfg.chat_style not in ("qwen2", "release"):
        raise SystemExit(f"sft: --chat-style is qwen2 or release, not {cfg.chat_style!r}")
    hint = "run `python train.py` first" if cfg.init == Config.init else "--init names the pre-trained VLM"
    try:  # what weights.load_vlm will load (a dir, a file, or a hub id)
        init = W.resolve(cfg.init, ("config.json", "tokenizer.json"))
    except FileNotFoundError as e:
        raise SystemExit(f"sft: no pre-trained model at --init {cfg.init!r}: {hint} ({e})") from None
    saved = W.read_config(M.need(init, hint, "config.json")) if os.path.isdir(init) else {}  # final/ records its stage
    if "stage" in saved and "model_type" not in saved:  # train.py's OUT/config.json: the model is OUT/final
        raise SystemExit(f"error: {init}: a training run's dir, not a checkpoint; its model is {init}/final")
    if saved.get("stage") == "sft" and rank == 0:  # allowed: more tuning, on other data or with other flags
        print(f"sft: note: --init {init} is already instruction-tuned (stage sft); tuning it further")
    tok = cfg.tokenizer or os.path.join(init if os.path.isdir(init) else os.path.dirname(init), "tokenizer.json")
    if not os.path.isfile(tok):
        raise SystemExit(f"sft: no tokenizer.json beside --init {cfg.init}: pass --tokenizer")
    if rank == 0:
        prepare_rows(cfg, tok)
    if dist.is_initialized():
        dist.barrier()
    return cfg.prepared, tok


def main(argv=None):
    cfg = M.parse_config(Config, argv, PRESETS)
    if cfg.prepare_only:
        prepare(cfg, 0)
    else:
        train.main(argv, Config, PRESETS, "sft", prepare)


if __name__ == "__main__":
    sys.exit(main())
