"""
Offline multimodal sequence packing (reference.md §2). WebDataset shards of image-caption pairs, and OBELICS-style
interleaved documents, become WebDataset shards whose samples are packed rows of at most --seq-len tokens, each
image counting as --image-tokens tokens once the LLM sees it.

    python pack.py --input '/data/datacomp/{00000000..00002012}.tar' --output /data/packed --tokenizer tok.json

Output, for each input shard NAME.tar (one worker process per shard):
    DIR/NAME.tar         one sample per row, KEY = the row's index as 6 digits:
                           KEY.json            {"doc_lengths", "keys", "uids"}, one entry per document, in row order
                           KEY.input_ids.npy   int32 ids with ONE IMAGE_ID (-200) per image, not expanded
                           KEY.NNNN.EXT        the row's images, their original bytes, in IMAGE_ID order
    DIR/NAME.stats.json  counts, settings and row offsets; written last, so a shard without it is unfinished
    DIR/stats.json       totals over all input shards, written when the run completes
Every file is written under a temporary name and renamed into place; a killed run leaves nothing that looks finished,
and a rerun redoes exactly the shards that have no stats file. Same input and flags give byte-identical output.

Where this deliberately differs from the official packer:
- Images are never decoded. The header is checked (format, dimensions, a complete trailer) and the bytes are copied
  through unchanged; decoding and re-encoding every image made the official packer slow, lossy and large.
- No pickle and no pad tokens on disk (the official pkl rows were padded with a token that training then learned, §7).
- Bad records (broken images, missing or undecodable captions, truncated tars) are skipped and counted by reason.
  Captions are stripped of surrounding whitespace.
- --method fill (default) closes each row with an exact subset-sum search; --method ffd is the paper's
  first-fit-decreasing, in O(n log n). Both pack each shard independently, as the paper does.
"""
from __future__ import annotations

import base64
import binascii
import glob
import hashlib
import io
import json
import multiprocessing
import os
import re
import sys
import tarfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from model import IMAGE_ID, MAX_IMAGE_PIXELS, Tokenizer, caption_tokens, interleaved_tokens, parse_config


@dataclass
class PackConfig:
    input: list[str] = field(default_factory=list)  # shards: files, directories, globs, {a..b} and {x,y} patterns
    output: str = ""  # output directory
    tokenizer: str = ""  # tokenizer.json, or a directory holding one
    seq_len: int = 4096  # row capacity, counted after image expansion
    image_tokens: int = 144  # what one image becomes in the LLM: 12x12 pooled SigLIP patches
    method: str = "fill"  # fill: exact row closing (default) | ffd: the paper's first-fit-decreasing
    long: str = "truncate"  # a document longer than a row: truncate (keep its beginning) | drop
    workers: int = 0  # processes, one shard at a time each; 0 = all cores


IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")  # the official rename("jpg;png;jpeg;webp"): the first one present wins
FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}  # what we accept, as extension

# ---------------------------------------------------------------------------------------------------------------------
# Inputs


def expand_braces(pattern: str) -> list[str]:
    """Shell braces, for patterns that were quoted: 'a{08..10}' -> a08 a09 a10, 'x{a,b}' -> xa xb."""
    m = re.search(r"\{([^{}]*)\}", pattern)
    if not m:
        return [pattern]
    head, body, tail = pattern[: m.start()], m.group(1), pattern[m.end():]
    r = re.fullmatch(r"(-?\d+)\.\.(-?\d+)", body)
    if r:
        a, b = r.groups()
        width = max(len(a), len(b)) if any(len(x) > 1 and x.startswith("0") for x in (a, b)) else 0
        step = 1 if int(b) >= int(a) else -1
        options = [str(i).zfill(width) for i in range(int(a), int(b) + step, step)]
    elif "," in body:
        options = body.split(",")
    else:  # not a brace expression: keep it literally
        return [head + "{" + body + "}" + rest for rest in expand_braces(tail)]
    return [p for o in options for p in expand_braces(head + o + tail)]


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Patterns -> absolute shard paths, in the given order (each glob or directory sorted), duplicates removed.
    Anything that matches nothing is an error: a missing shard must not vanish silently from the data."""
    paths = []
    for pattern in patterns:
        for p in expand_braces(pattern):
            if os.path.isdir(p):
                found = sorted(glob.glob(os.path.join(glob.escape(p), "*.tar")))
            elif any(c in p for c in "*?["):
                found = sorted(glob.glob(p))
            else:
                found = [p] if os.path.isfile(p) else []
            if not found:
                raise SystemExit(f"pack: no input shard at {p!r}")
            paths += found
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def output_names(paths: list[str]) -> list[str]:
    """Each input's output NAME: its file name without .tar, or its path below the inputs' common folder (with / as
    __) when file names collide, e.g. ccs/00000.tar and datacomp/00000.tar."""
    names = [os.path.basename(p).removesuffix(".tar") for p in paths]
    if len(set(names)) < len(names):
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        names = [os.path.relpath(p, root).removesuffix(".tar").replace(os.sep, "__") for p in paths]
    if len(set(names)) < len(names):
        raise SystemExit("pack: two inputs map to the same output name")
    return names


def read_tar(path: str):
    """Yield (key, {ext: (bytes, offset in the tar)}) per sample, grouping consecutive members by key as webdataset
    does (key = the member path up to the first dot of its file name). A broken tar (cut short, a corrupt header, no
    end-of-archive blocks) ends with one (key, None): the sample being read when it broke (key None if none was)."""
    key, members = None, {}
    with open(path, "rb") as f:
        try:
            tar = tarfile.open(fileobj=f, mode="r:")
            for m in tar:
                folder, _, name = m.name.rpartition("/")
                stem, dot, ext = name.partition(".")
                if not m.isfile() or not dot:
                    continue
                k = folder + "/" + stem if folder else stem
                if k != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                f.seek(m.offset_data)
                data = f.read(m.size)
                if len(data) < m.size:
                    raise tarfile.ReadError("unexpected end of data")
                members.setdefault(ext.lower(), (data, m.offset_data))
            # tarfile ends quietly at a cut or corrupt header; a whole tar ends in zero blocks, so look for them
            f.seek(tar.offset)
            tail = f.read(1024)
            if len(tail) < 512 or tail.strip(b"\0"):
                raise tarfile.ReadError(f"no end-of-archive marker at byte {tar.offset}")
        except tarfile.TarError as e:
            print(f"pack: {path}: broken tar ({e}); keeping the samples before the break", file=sys.stderr)
            yield key, None
            return
    if key is not None:
        yield key, members


# ---------------------------------------------------------------------------------------------------------------------
# Documents: checked without decoding any image


def check_image(data: bytes) -> tuple[str | None, str | None]:
    """(extension, None) for an image that will load, else (None, skip reason). Image.open reads only the header;
    a complete file must also end with its format's trailer, which catches truncated downloads cheaply."""
    if not data:
        return None, "empty_image"
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # we apply model.py's limit below
            img = Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "WEBP", "GIF"])
            fmt, (w, h) = img.format, img.size
    except Image.DecompressionBombError:
        return None, "huge_image"
    except Exception:  # PIL raises many kinds for garbage; all mean the same here
        return None, "corrupt_image"
    tail = data[-1024:].rstrip(b"\0")  # some writers pad files with zeros
    if fmt == "PNG":
        complete = tail[-8:-4] == b"IEND"  # the IEND chunk: length 0, "IEND", CRC
    elif fmt == "WEBP":
        complete = len(data) >= 8 + int.from_bytes(data[4:8], "little")  # the RIFF header holds the file size
    elif fmt == "GIF":
        complete = tail[-1:] == b";"  # the trailer byte
    else:
        complete = tail[-2:] == b"\xff\xd9"  # JPEG's end-of-image marker
    if not complete:
        return None, "corrupt_image"
    if w * h > MAX_IMAGE_PIXELS:  # model.load_image refuses these, so training could not use them
        return None, "huge_image"
    if min(w, h) <= 1:  # the official packer drops images with a 1-px side
        return None, "tiny_image"
    return FORMATS[fmt], None


@dataclass
class Doc:
    key: str
    uid: object  # the json's uid as it is (DataComp: a hex string), or None
    ids: list[int]  # the pre-training format (model.py), one IMAGE_ID per image
    images: list  # (ext, bytes) or (ext, (offset, size) in the source tar), one per IMAGE_ID


def read_doc(key: str, members: dict, tok: Tokenizer, counts: Counter) -> Doc | str:
    """One sample -> a Doc, or the reason it is skipped."""
    meta = {}
    if "json" in members:
        try:
            meta = json.loads(members["json"][0])
        except ValueError:
            return "bad_json"
        if not isinstance(meta, dict):
            return "bad_json"
    key, uid = str(meta.get("key") or key), meta.get("uid")
    if "texts" in meta and "image_info" in meta:
        return read_interleaved(key, uid, meta, tok, counts)
    image = next((members[e] for e in IMAGE_EXTS if e in members), None)
    if image is None:
        return "missing_image"
    if "txt" not in members:
        return "missing_caption"
    try:
        caption = members["txt"][0].decode("utf-8").strip()
    except UnicodeDecodeError:
        return "bad_text"
    if not caption:
        return "empty_caption"
    data, offset = image
    ext, bad = check_image(data)
    if bad:
        return bad
    return Doc(key, uid, caption_tokens(tok, caption), [(ext, (offset, len(data)))])  # bytes re-read when written


def read_interleaved(key: str, uid, meta: dict, tok: Tokenizer, counts: Counter) -> Doc | str:
    """OBELICS-style {"texts": [...], "image_info": [...]}: position i is an image when image_info[i] holds one (as
    base64), else the text texts[i]. Broken images are left out of the document and counted as dropped_images; a
    document left with no image is skipped (the last broken image's reason, or missing_image)."""
    texts, infos = meta["texts"], meta["image_info"]
    if not (isinstance(texts, list) and isinstance(infos, list) and len(texts) == len(infos)):
        return "bad_json"
    items, images, why, dropped = [], [], "missing_image", 0
    for text, info in zip(texts, infos):
        if isinstance(info, dict) and info.get("image_base64"):
            try:
                data = base64.b64decode(info["image_base64"], validate=True)
            except (binascii.Error, TypeError, ValueError):
                data = b"\x00"  # undecodable base64 -> corrupt_image
            ext, bad = check_image(data)
            if bad:
                why, dropped = bad, dropped + 1
                continue
            items.append(None)
            images.append((ext, data))
        elif isinstance(text, str) and text.strip():
            items.append(text)
    if not images:
        return why
    counts["dropped_images"] += dropped
    return Doc(key, uid, interleaved_tokens(tok, items), images)


def fit(ids: list[int], image_tokens: int, seq_len: int, eos: int) -> list[int]:
    """The longest beginning of `ids` that fits a row with a closing EOS, minus trailing images (no text would
    follow them to learn from)."""
    used, m = 1, 0  # the EOS
    for i in ids:
        used += image_tokens if i == IMAGE_ID else 1
        if used > seq_len:
            break
        m += 1
    while m and ids[m - 1] == IMAGE_ID:
        m -= 1
    return ids[:m] + [eos]


# ---------------------------------------------------------------------------------------------------------------------
# Packing: lengths -> rows (lists of indices into lengths). Every length must be <= cap.


def pack_ffd(lengths: list[int], cap: int) -> list[list[int]]:
    """First-fit-decreasing as the official packer does it (same bins, same order; ties keep input order), with a
    segment tree over bins holding each subtree's largest free space, so finding the first bin that fits is
    O(log n) instead of a scan over all bins."""
    size = 1 << max(len(lengths) - 1, 0).bit_length()  # leaves = bins; unopened bins are empty
    free = [cap] * (2 * size)
    rows: list[list[int]] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = 1
        while n < size:  # descend to the leftmost leaf with room
            n = 2 * n if free[2 * n] >= lengths[i] else 2 * n + 1
        if n - size == len(rows):
            rows.append([])
        rows[n - size].append(i)
        free[n] -= lengths[i]
        while n > 1:
            n //= 2
            free[n] = max(free[2 * n], free[2 * n + 1])
    return rows


def pack_fill(lengths: list[int], cap: int) -> list[list[int]]:
    """Rows that are full to the token. FFD strands ~70 tokens per row because the last gap is smaller than any
    caption (>= 144 + 4 tokens). Instead, each row takes the longest document left (long ones go first, while short
    ones remain to fill around them), then documents in a fixed scrambled order until the space left is a few short
    documents wide, then closes that space with a subset-sum search over all lengths left. Lengths are integers in a
    narrow range, so an exact fit almost always exists, and the scrambled order keeps the mix of lengths left
    diverse until the end. Measured on caption shards: the minimum number of rows, i.e. every row full but the last.
    """
    n = len(lengths)
    done = [False] * n
    longest = sorted(range(n), key=lambda i: -lengths[i])
    scrambled = sorted(range(n), key=lambda i: (i * 0x9E3779B1) % 2**32, reverse=True)  # golden-ratio hash order
    by_length: dict[int, list[int]] = {}  # length -> indices not yet placed (some may be done: skipped lazily)
    for i in reversed(longest):
        by_length.setdefault(lengths[i], []).append(i)
    left = Counter(lengths)  # length -> how many are not yet placed
    short = lengths[longest[n - 1 - n // 10]] if n else 1  # a short document: a tenth are shorter
    window = min(cap, 6 * short)  # the room left for the search to close: a few short documents
    rows, top = [], 0

    def place(i, row):
        done[i] = True
        left[lengths[i]] -= 1
        row.append(i)
        return lengths[i]

    while top < n:
        row: list[int] = []
        room = cap - place(longest[top], row)
        while scrambled and room > window:
            i = scrambled[-1]
            if not done[i] and room - lengths[i] < window:
                break
            scrambled.pop()
            if not done[i]:
                room -= place(i, row)
        # bounded subset sum as a bitset: bit s of `reach` says some choice of the lengths so far sums to s
        steps, reach, mask = [], 1, (1 << (room + 1)) - 1
        for v in sorted(v for v, c in left.items() if c and v <= room):
            for _ in range(min(left[v], room // v)):
                steps.append((v, reach))
                reach = (reach | reach << v) & mask
        s = reach.bit_length() - 1  # the fullest reachable fill; room when an exact fit exists
        for v, before in reversed(steps):  # walk back: take v only where s was not reachable without it
            if not before >> s & 1:
                s -= v
                stack = by_length[v]
                while done[stack[-1]]:
                    stack.pop()
                place(stack.pop(), row)
        rows.append(sorted(row))
        while top < n and done[longest[top]]:
            top += 1
    ffd = pack_ffd(lengths, cap)  # cheap insurance for length mixes far from captions: never worse than the paper
    return ffd if len(ffd) < len(rows) else rows


PACKERS = {"fill": pack_fill, "ffd": pack_ffd}

# ---------------------------------------------------------------------------------------------------------------------
# One shard


def _settings(cfg: PackConfig, tok: Tokenizer) -> dict:
    """What the output depends on besides the input: a rerun must not mix shards packed differently."""
    path = os.path.join(cfg.tokenizer, "tokenizer.json") if os.path.isdir(cfg.tokenizer) else cfg.tokenizer
    with open(path, "rb") as f:
        sha = hashlib.sha256(f.read()).hexdigest()
    return {"seq_len": cfg.seq_len, "image_tokens": cfg.image_tokens, "method": cfg.method, "long": cfg.long,
            "vocab_size": len(tok), "tokenizer_sha256": sha}


def _add(tar: tarfile.TarFile, name: str, data: bytes):
    info = tarfile.TarInfo(name)  # mtime 0, uid/gid 0, mode 644: nothing about this run leaks into the bytes
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _replace(tmp: str, path: str):
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())  # the data is on disk before the name says it is finished
    os.replace(tmp, path)


def pack_shard(src: str, out_dir: str, name: str, cfg: PackConfig, tok: Tokenizer, settings: dict) -> dict:
    """Pack one input shard into out_dir/name.tar and write out_dir/name.stats.json (last). Returns the stats."""
    T, C = cfg.image_tokens, cfg.seq_len
    docs, skipped, counts, samples_in, broken = [], Counter(), Counter(), 0, False
    for key, members in read_tar(src):
        if members is None:
            broken = True
            if key is None:
                continue
            d = "truncated_tar"
        else:
            d = read_doc(key, members, tok, counts)
        samples_in += 1
        if isinstance(d, str):
            skipped[d] += 1
            continue
        if len(d.ids) + (T - 1) * len(d.images) > C:
            if cfg.long == "truncate":
                d.ids = fit(d.ids, T, C, tok.eos_id)
                d.images = d.images[: d.ids.count(IMAGE_ID)]
            if cfg.long == "drop" or not d.images:
                skipped["too_long"] += 1
                continue
            counts["truncated_docs"] += 1
        docs.append(d)

    lengths = [len(d.ids) + (T - 1) * len(d.images) for d in docs]
    rows = PACKERS[cfg.method](lengths, C)
    path, tmp = os.path.join(out_dir, name + ".tar"), os.path.join(out_dir, "." + name + ".tar.tmp")
    offsets = []
    with open(src, "rb") as source, open(tmp, "wb") as f, tarfile.open(fileobj=f, mode="w") as tar:
        for r, row in enumerate(rows):
            offsets.append(tar.offset)
            k = f"{r:06d}"
            meta = {"doc_lengths": [len(docs[i].ids) for i in row], "keys": [docs[i].key for i in row],
                    "uids": [docs[i].uid for i in row]}
            _add(tar, k + ".json", json.dumps(meta).encode())
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.array([t for i in row for t in docs[i].ids], np.int32), allow_pickle=False)
            _add(tar, k + ".input_ids.npy", buf.getvalue())
            for j, (ext, image) in enumerate(im for i in row for im in docs[i].images):
                if isinstance(image, tuple):  # (offset, size) in the source tar: copy the original bytes
                    source.seek(image[0])
                    image = source.read(image[1])
                _add(tar, f"{k}.{j:04d}.{ext}", image)
    _replace(tmp, path)

    tokens = sum(lengths)
    stats = {"source": src, "samples_in": samples_in, "docs_out": len(docs), "rows": len(rows), "tokens": tokens,
             "fill": tokens / (len(rows) * C) if rows else 0.0, "skipped": dict(sorted(skipped.items())),
             "truncated_docs": counts["truncated_docs"], "images": sum(len(d.images) for d in docs),
             "dropped_images": counts["dropped_images"], "broken_tar": broken, **settings,
             "bytes": os.path.getsize(path), "row_offsets": offsets,
             "row_tokens": [sum(lengths[i] for i in row) for row in rows]}
    assert samples_in == len(docs) + sum(skipped.values()), "a sample was neither packed nor counted"
    with open(os.path.join(out_dir, "." + name + ".stats.json.tmp"), "w") as f:
        json.dump(stats, f, indent=1)
    _replace(os.path.join(out_dir, "." + name + ".stats.json.tmp"), os.path.join(out_dir, name + ".stats.json"))
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Reading packed rows (train.py)


def _shard_stats(tar_path: str) -> dict | None:
    """A shard's stats if it is finished: its stats file exists and its tar has the size the stats recorded."""
    try:
        with open(tar_path.removesuffix(".tar") + ".stats.json") as f:
            stats = json.load(f)
        return stats if os.path.getsize(tar_path) == stats["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


def packed_shards(out_dir: str) -> list[tuple[str, int]]:
    """[(tar path, number of rows)] for every finished shard in out_dir, sorted by name."""
    found = []
    for p in sorted(glob.glob(os.path.join(glob.escape(out_dir), "*.stats.json"))):
        tar_path = p.removesuffix(".stats.json") + ".tar"
        if os.path.basename(p) != "stats.json" and (stats := _shard_stats(tar_path)) is not None:
            found.append((tar_path, stats["rows"]))
    return found


def iter_rows(shard_path: str, start: int = 0):
    """Yield the rows of one finished shard from row `start` on (a seek, not a scan), each a dict: input_ids
    (int32 array), doc_lengths, keys, uids, images (list of bytes), plus shard and row for bookkeeping."""
    stats = _shard_stats(shard_path)
    if stats is None:
        raise FileNotFoundError(f"{shard_path} is not a finished packed shard")
    if start >= stats["rows"]:
        return
    with open(shard_path, "rb") as f:
        f.seek(stats["row_offsets"][start])
        row, members = start, {}
        for m in tarfile.open(fileobj=f, mode="r:"):  # reads headers from the current position on
            key, _, ext = m.name.partition(".")
            if int(key) != row:
                yield _row(shard_path, row, members)
                row, members = int(key), {}
            f.seek(m.offset_data)
            members[ext] = f.read(m.size)
        if members:
            yield _row(shard_path, row, members)


def _row(shard_path: str, row: int, members: dict) -> dict:
    meta = json.loads(members.pop("json"))
    ids = np.load(io.BytesIO(members.pop("input_ids.npy")), allow_pickle=False)
    images = [members[e] for e in sorted(members, key=lambda e: int(e.partition(".")[0]))]
    if sum(meta["doc_lengths"]) != len(ids) or int((ids == IMAGE_ID).sum()) != len(images):
        raise ValueError(f"{shard_path}: row {row} is inconsistent")
    return {"input_ids": ids, "images": images, "shard": os.path.basename(shard_path), "row": row, **meta}


def read_packed(out_dir: str):
    """Every row of every finished shard in out_dir, shard by shard in name order, rows in order."""
    for path, _ in packed_shards(out_dir):
        yield from iter_rows(path)


# ---------------------------------------------------------------------------------------------------------------------
# Command line: a pool of workers, one shard each, progress, totals


_worker = {}


def _init_worker(cfg: PackConfig):
    _worker["tok"] = Tokenizer(cfg.tokenizer)
    _worker["settings"] = _settings(cfg, _worker["tok"])


def _pack_one(job):
    src, name, cfg = job
    return pack_shard(src, cfg.output, name, cfg, _worker["tok"], _worker["settings"])


def _take_inputs(argv: list[str]) -> tuple[list[str], list[str]]:
    """`--input A B C` takes several values, which parse_config does not do: pull them out first."""
    inputs, rest, i = [], [], 0
    while i < len(argv):
        if argv[i] == "--input" or argv[i].startswith("--input="):
            if "=" in argv[i]:
                inputs.append(argv[i].partition("=")[2])
            i += 1
            while i < len(argv) and not argv[i].startswith("--"):
                inputs.append(argv[i])
                i += 1
        else:
            rest.append(argv[i])
            i += 1
    return inputs, rest


def main(argv: list[str] | None = None) -> dict:
    inputs, argv = _take_inputs(list(sys.argv[1:] if argv is None else argv))
    cfg = parse_config(PackConfig, argv)
    cfg.input = inputs
    if not (cfg.input and cfg.output and cfg.tokenizer):
        raise SystemExit("pack: --input, --output and --tokenizer are required")
    if cfg.method not in PACKERS or cfg.long not in ("truncate", "drop"):
        raise SystemExit(f"pack: --method is one of {list(PACKERS)}, --long is truncate or drop")
    if cfg.image_tokens < 1 or cfg.seq_len < cfg.image_tokens + 3:
        raise SystemExit("pack: --seq-len must hold at least one image plus <s>, a newline and the EOS")
    sources = resolve_inputs(cfg.input)
    if any(os.path.dirname(s) == os.path.abspath(cfg.output) for s in sources):
        raise SystemExit("pack: an input shard is inside --output; a rerun would pack its own output")
    names = output_names(sources)
    os.makedirs(cfg.output, exist_ok=True)
    for p in glob.glob(os.path.join(glob.escape(cfg.output), ".*.tmp")):
        os.remove(p)  # left by a killed run
    settings = _settings(cfg, Tokenizer(cfg.tokenizer))
    todo = []
    for src, name in zip(sources, names):
        stats = _shard_stats(os.path.join(cfg.output, name + ".tar"))
        if stats is None:
            todo.append((src, name, cfg))
        elif any(stats.get(k) != v for k, v in settings.items()):
            raise SystemExit(f"pack: {cfg.output}/{name} was packed with other settings than "
                             f"{settings}; use another --output")
    extra = {p for p, _ in packed_shards(cfg.output)} - {os.path.join(cfg.output, n + ".tar") for n in names}
    if extra:
        print(f"pack: warning: {len(extra)} finished shards in {cfg.output} are not from these inputs, "
              "and read_packed will read them too", file=sys.stderr)
    top = os.path.join(cfg.output, "stats.json")
    if todo and os.path.exists(top):
        os.remove(top)  # it describes a finished run; this one is not finished yet

    workers = min(cfg.workers or len(os.sched_getaffinity(0)), max(len(todo), 1))
    print(f"pack: {len(sources)} shards, {len(sources) - len(todo)} already done, {workers} workers", file=sys.stderr)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker; the processes are the parallelism
    t0, samples = time.time(), 0
    if workers > 1:
        pool = multiprocessing.Pool(workers, _init_worker, (cfg,))
        results = pool.imap_unordered(_pack_one, todo)
    else:
        _init_worker(cfg)
        pool, results = None, map(_pack_one, todo)
    for done, stats in enumerate(results, 1):
        samples += stats["samples_in"]
        dt = time.time() - t0
        eta = dt / done * (len(todo) - done)
        print(f"pack: {done}/{len(todo)} shards, {samples / dt:,.0f} samples/s, ETA {eta / 60:.1f} min",
              file=sys.stderr, end="\r" if sys.stderr.isatty() and done < len(todo) else "\n")
    if pool is not None:
        pool.close()
        pool.join()

    per_shard = [_shard_stats(os.path.join(cfg.output, n + ".tar")) for n in names]
    skipped = Counter()
    for s in per_shard:
        skipped.update(s["skipped"])
    total = {k: sum(s[k] for s in per_shard) for k in ("samples_in", "docs_out", "rows", "tokens", "images",
                                                     "truncated_docs", "dropped_images")}
    total.update(fill=total["tokens"] / (total["rows"] * cfg.seq_len) if total["rows"] else 0.0,
                 skipped=dict(sorted(skipped.items())), shards=len(names),
                 broken_tars=[s["source"] for s in per_shard if s["broken_tar"]], **settings)
    with open(os.path.join(cfg.output, ".stats.json.tmp"), "w") as f:
        json.dump(total, f, indent=1)
    _replace(os.path.join(cfg.output, ".stats.json.tmp"), top)
    print(f"pack: {total['samples_in']:,} samples -> {total['docs_out']:,} documents in {total['rows']:,} rows of "
          f"{cfg.seq_len}, fill {total['fill']:.2%}; {total['truncated_docs']:,} truncated, skipped "
          f"{sum(skipped.values()):,}: {dict(skipped) or 'none'}" + (f"; broken tars: {total['broken_tars']}"
                                                                        if total["broken_tars"] else ""))
    return total


if __name__ == "__main__":
    main()
