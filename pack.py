"""
Offline multimodal sequence packing (reference.md §2). WebDataset shards of image-caption pairs (and OBELICS-style
interleaved documents) become WebDataset shards whose samples are rows of at most --seq-len tokens, an image
counting as the --image-tokens it becomes in the LLM.

    python pack.py --input '/data/datacomp/{00000000..00002012}.tar' --output /data/packed --tokenizer tok.json

For each input shard NAME.tar, one worker process writes:
    DIR/NAME.tar         one sample per row, KEY = the row index, 6 digits:
                           KEY.json            {"doc_lengths", "keys", "uids"}: one entry per document, in row order
                           KEY.input_ids.npy   int32 ids, ONE IMAGE_ID (-200) per image (not expanded)
                           KEY.labels.npy      (sft.py's rows only) int32, IGNORE where unsupervised
                           KEY.NNNN.EXT        the row's images, original bytes, in IMAGE_ID order
    DIR/NAME.stats.json  counts, settings and row offsets, written last: without it the shard is unfinished
and when all are done, DIR/stats.json with the totals. Files are written under temporary names and renamed, so a
killed run leaves nothing that looks finished; a rerun redoes exactly the unfinished shards, byte-identically.

Unlike the official packer: images are never decoded (the header and trailer are checked, the bytes copied as they
are; decoding and re-encoding made it slow, lossy and large); no pickle and no pad tokens on disk (§7); broken
records are skipped and counted by reason; captions are stripped. --method ffd is the paper's first-fit-decreasing
(in O(n log n)); the default, fill, closes every row exactly. Both pack each shard on its own, as the paper does.
"""
from __future__ import annotations

import base64
import functools
import glob
import hashlib
import io
import json
import mmap
import multiprocessing
import os
import re
import sys
import time
import warnings
from collections import Counter
from contextlib import nullcontext
from dataclasses import dataclass, field

import numpy as np
from PIL import Image

from model import IMAGE_ID, MAX_IMAGE_PIXELS, Tokenizer, caption_tokens, interleaved_tokens, parse_config, write_json


@dataclass
class PackConfig:
    """Pack WebDataset shards of image-text data into fixed-capacity rows (pack.py's docstring has the format)."""
    input: list[str] = field(default_factory=list)  # shards: files, directories, globs, {a..b} and {x,y} patterns
    output: str = ""  # output directory
    tokenizer: str = ""  # tokenizer.json, or a directory holding one
    seq_len: int = 4096  # row capacity, counted after image expansion
    image_tokens: int = 144  # what one image becomes in the LLM: 12x12 pooled SigLIP patches
    method: str = "fill"  # fill: rows closed exactly (default) | ffd: the paper's first-fit-decreasing
    long: str = "truncate"  # a document longer than a row: truncate (keep its beginning) | drop
    workers: int = 0  # processes, one shard at a time each; 0 = all cores


IMAGE_EXTS = ("jpg", "png", "jpeg", "webp")  # the official rename("jpg;png;jpeg;webp"): the first one present wins
FORMATS = {"JPEG": "jpg", "MPO": "jpg", "PNG": "png", "WEBP": "webp", "GIF": "gif"}  # accepted, and their extension

# ---------------------------------------------------------------------------------------------------------------------
# Input shards


def expand_braces(pattern: str) -> list[str]:
    """Shell braces, for patterns that were quoted: 'a{08..10}' -> a08 a09 a10, 'x{a,b}' -> xa xb."""
    m = re.search(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}", pattern)  # the first range or list; {x} stays {x}
    if not m:
        return [pattern]
    if m[3] is not None:
        options = m[3].split(",")
    else:
        a, b = m.group(1, 2)
        width = max(len(a), len(b)) if any(len(x) > 1 and x[0] == "0" for x in (a, b)) else 0  # as bash pads
        options = [str(i).zfill(width) for i in range(min(int(a), int(b)), max(int(a), int(b)) + 1)]
    return [p for o in options for p in expand_braces(pattern[: m.start()] + o + pattern[m.end():])]


def resolve_inputs(patterns: list[str]) -> list[str]:
    """Patterns -> absolute shard paths in the given order (each glob or directory sorted), without duplicates. A
    pattern that matches nothing is an error: a missing shard must not vanish silently from the data."""
    paths = []
    for p in (p for pattern in patterns for p in expand_braces(pattern)):
        g = os.path.join(glob.escape(p), "*.tar") if os.path.isdir(p) else p
        found = sorted(glob.glob(g)) if any(c in g for c in "*?[") else [p] if os.path.isfile(p) else []
        if not found:
            raise SystemExit(f"pack: no input shard at {p!r}")
        paths += found
    return list(dict.fromkeys(os.path.abspath(p) for p in paths))


def output_names(paths: list[str]) -> list[str]:
    """Each input's output NAME: its file name without .tar or, when names collide (ccs/00000.tar and
    datacomp/00000.tar), its path below the inputs' common folder with / as __."""
    names = [os.path.basename(p).removesuffix(".tar") for p in paths]
    if len(set(names)) < len(names):
        root = os.path.commonpath([os.path.dirname(p) for p in paths])
        names = [os.path.relpath(p, root).removesuffix(".tar").replace(os.sep, "__") for p in paths]
    return names


def _octal(b: bytes) -> int:
    return int(b.strip(b"\0 ") or b"0", 8)


def read_tar(path: str, offset: int = 0):
    """Yield (key, {ext: (bytes, their offset in the file)}) per sample, grouping consecutive members by key as
    webdataset does (key: member path up to the first dot of the file name; ext: the rest, lower-cased). A broken
    tar (cut short, a corrupt header) ends with (key, error message): key is the sample that was being read when it
    broke, maybe incomplete, or None. Headers are parsed here (ustar, pax and GNU long names) from a memory map:
    several times faster than tarfile, which also takes a cut or corrupt header for the end of the archive."""
    key, members, long_name, pos = None, {}, None, offset
    with _mapped(path) as buf:
        try:
            while (h := buf[pos: pos + 512]).strip(b"\0") or len(h) < 512:  # a zero block ends the archive
                if len(h) < 512 or _octal(h[148:156]) != sum(h) - sum(h[148:156]) + 8 * 32:
                    raise ValueError("cut short" if len(h) < 512 else "corrupt header")
                size, kind, at = _octal(h[124:136]), h[156:157], pos + 512
                if at + size > len(buf):
                    raise ValueError("cut short")
                data, pos = buf[at: at + size], at + size + (-size % 512)
                if kind == b"L":  # GNU: the next member's long name
                    long_name = data.rstrip(b"\0").decode(errors="replace")
                    continue
                if kind == b"x":  # pax: "LENGTH key=value\n" records for the next member, of which path= is its name
                    long_name = (m := re.search(rb"(?m)^[^ \n]* path=(.*)", data)) and m[1].decode(errors="replace")
                    continue
                prefix = h[345:500].rstrip(b"\0") + b"/" if h[257:262] == b"ustar" and h[345] else b""
                name, long_name = long_name or (prefix + h[:100].rstrip(b"\0")).decode(errors="replace"), None
                folder, _, base = name.rpartition("/")
                stem, dot, ext = base.partition(".")
                if kind not in (b"0", b"\0", b"7") or not dot:  # directories, links, files without a suffix
                    continue
                if (k := f"{folder}/{stem}" if folder else stem) != key:
                    if key is not None:
                        yield key, members
                    key, members = k, {}
                members.setdefault(ext.lower(), (data, at))
        except ValueError as e:
            yield key, f"{e} at byte {pos}"
            return
    if key is not None:
        yield key, members


def _mapped(path: str):
    """The file's bytes as a read-only memory map (b"" for an empty file, which mmap refuses)."""
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if os.fstat(f.fileno()).st_size else nullcontext(b"")


# ---------------------------------------------------------------------------------------------------------------------
# Documents, checked without decoding any image


def check_image(data: bytes) -> tuple[str | None, str | None]:
    """(extension, None) for an image that will load, else (None, skip reason). Image.open reads only the header; a
    complete file also ends with its format's trailer, which catches truncated downloads cheaply."""
    if not data:
        return None, "empty_image"
    try:  # (PIL warns past its pixel limit: pack's workers silence that, model.py's limit is applied below)
        img = Image.open(io.BytesIO(data), formats=["JPEG", "PNG", "WEBP", "GIF"])
        fmt, (w, h) = img.format, img.size
    except Image.DecompressionBombError:
        return None, "huge_image"
    except Exception:  # PIL raises many kinds for garbage; they all mean the same here
        return None, "corrupt_image"
    tail = data[-1024:].rstrip(b"\0")  # some writers pad files with zeros
    complete = {"PNG": tail[-8:-4] == b"IEND",  # the last chunk: length 0, "IEND", CRC
                "WEBP": len(data) >= 8 + int.from_bytes(data[4:8], "little"),  # the RIFF header holds the file size
                "GIF": tail[-1:] == b";"}.get(fmt, tail[-2:] == b"\xff\xd9")  # GIF's trailer; JPEG's end of image
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
    uid: object  # the json's uid as it is (DataComp: 32 hex digits), or None
    ids: list[int]  # model.py's pre-training format, one IMAGE_ID per image
    images: list  # per IMAGE_ID: (ext, bytes), or (ext, where in the source tar: a slice), read again when written
    labels: list[int] | None = None  # SFT: per id, IGNORE where unsupervised; None: the ids (pre-training)


def read_doc(key: str, members: dict, tok: Tokenizer, counts: Counter) -> Doc | str:
    """One sample -> a Doc, or the reason it is skipped. With an OBELICS-style json {"texts": [...], "image_info":
    [...]} it is an interleaved document: item i is image_info[i]'s base64 image if it has one, else texts[i]. Broken
    images are left out (dropped_images); left with none, it is skipped for the last one's reason, or missing_image."""
    try:
        meta = json.loads(members["json"][0]) if "json" in members else {}
        key, uid = str(meta.get("key") or key), meta.get("uid")
    except (ValueError, AttributeError):  # not json, or json but not an object
        return "bad_json"
    if "texts" not in meta or "image_info" not in meta:  # an image-caption pair
        image = next((members[e] for e in IMAGE_EXTS if e in members), None)
        if image is None or "txt" not in members:
            return "missing_caption" if image else "missing_image"
        try:
            caption = members["txt"][0].decode("utf-8").strip()
        except UnicodeDecodeError:
            return "bad_text"
        if not caption:
            return "empty_caption"
        ext, bad = check_image(image[0])
        return bad or Doc(key, uid, caption_tokens(tok, caption), [(ext, slice(image[1], image[1] + len(image[0])))])
    texts, infos = meta["texts"], meta["image_info"]
    if not (isinstance(texts, list) and isinstance(infos, list) and len(texts) == len(infos)):
        return "bad_json"
    items, images, why, dropped = [], [], "missing_image", 0
    for text, info in zip(texts, infos):
        if isinstance(info, dict) and info.get("image_base64"):
            try:
                data = base64.b64decode(info["image_base64"], validate=True)
            except (TypeError, ValueError):  # binascii.Error is a ValueError
                data = b"?"  # -> corrupt_image
            ext, bad = check_image(data)
            if bad:
                why, dropped = bad, dropped + 1
            else:
                items.append(None)
                images.append((ext, data))
        elif isinstance(text, str) and text.strip():
            items.append(text)
    if not images:
        return why
    counts["dropped_images"] += dropped
    return Doc(key, uid, interleaved_tokens(tok, items), images)


def fit(ids: list[int], image_tokens: int, seq_len: int, eos: int) -> list[int]:
    """The longest beginning of `ids` that fits a row with a closing EOS, without trailing images (no text would
    follow them to learn from)."""
    used, m = 1, 0  # the EOS
    while m < len(ids) and (used := used + (image_tokens if ids[m] == IMAGE_ID else 1)) <= seq_len:
        m += 1
    while m and ids[m - 1] == IMAGE_ID:
        m -= 1
    return ids[:m] + [eos]


# ---------------------------------------------------------------------------------------------------------------------
# Packing: lengths (each <= cap) -> rows, lists of indices into lengths


def pack_ffd(lengths: list[int], cap: int) -> list[list[int]]:
    """First-fit-decreasing exactly as the official packer (same rows, same order; ties keep input order), with a
    segment tree over the rows holding each subtree's largest free space, so that finding the first row with room
    takes O(log n) instead of a scan over all rows."""
    size = 1 << max(len(lengths) - 1, 0).bit_length()  # leaves: rows, opened left to right
    free, rows = [cap] * (2 * size), [[] for _ in range(size)]
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        n = 1
        while n < size:  # descend to the leftmost leaf with room
            n = 2 * n if free[2 * n] >= lengths[i] else 2 * n + 1
        rows[n - size].append(i)
        free[n] -= lengths[i]
        while n > 1:
            n //= 2
            free[n] = max(free[2 * n], free[2 * n + 1])
    return [row for row in rows if row]  # the rows opened, which are the first ones


def pack_fill(lengths: list[int], cap: int) -> list[list[int]]:
    """Rows full to the token. FFD strands ~70 tokens a row: its last gaps are smaller than any caption document
    (>= 144 + 4 tokens). Here each row takes the longest document left (long ones early, while short ones remain
    to fill around them), then documents in a fixed scrambled order until the room left is a few short documents
    wide, then closes that room with a subset-sum search over all lengths left. Lengths are integers in a narrow
    range, so an exact fit almost always exists, and the scrambled order keeps the lengths left varied to the end.
    On caption shards this gives the fewest rows possible: all full but the last (bench/pack.py)."""
    n, done = len(lengths), [False] * len(lengths)
    longest = sorted(range(n), key=lambda i: -lengths[i])
    scrambled = sorted(range(n), key=lambda i: -((i * 0x9E3779B1) % 2**32))  # golden-ratio hash order
    by_length: dict[int, list[int]] = {}  # length -> indices, placed ones skipped lazily
    for i in scrambled:
        by_length.setdefault(lengths[i], []).append(i)
    left = Counter(lengths)  # length -> how many are not placed yet
    window = min(cap, 6 * lengths[longest[n - 1 - n // 10]]) if n else 0  # a tenth of the documents are shorter
    rows, top = [], 0

    def place(i):
        done[i], left[lengths[i]] = True, left[lengths[i]] - 1
        row.append(i)
        return lengths[i]

    while top < n:
        row: list[int] = []
        room = cap - place(longest[top])
        while scrambled and room > window and (done[scrambled[-1]] or room - lengths[scrambled[-1]] >= window):
            i = scrambled.pop()
            room -= 0 if done[i] else place(i)
        # bounded subset sum as a bitset: bit s of `reach` is set when some choice of the lengths so far sums to s
        steps, reach, mask = [], 1, (1 << (room + 1)) - 1
        for v in sorted(v for v, c in left.items() if c and v <= room):
            for _ in range(min(left[v], room // v)):
                steps.append((v, reach))
                reach = (reach | reach << v) & mask
        s = reach.bit_length() - 1  # the fullest fill reachable: `room` itself when an exact fit exists
        for v, before in reversed(steps):  # walk back, taking v wherever s was not reachable without it
            if not before >> s & 1:
                s -= v
                while done[by_length[v][-1]]:
                    by_length[v].pop()
                place(by_length[v].pop())
        rows.append(sorted(row))
        while top < n and done[longest[top]]:
            top += 1
    return min(rows, pack_ffd(lengths, cap), key=len)  # insurance for lengths unlike captions: never worse than FFD


PACKERS = {"fill": pack_fill, "ffd": pack_ffd}

# ---------------------------------------------------------------------------------------------------------------------
# One shard


def tar_member(name: str, data: bytes) -> bytes:
    """A tar member: ustar header (mode 644, owner 0, mtime 0: nothing about the run leaks into the bytes), data,
    zero padding to a 512-byte block. By hand, because tarfile's writer costs ~15 us a member, 10% of the packer."""
    h = bytearray(name.encode().ljust(100, b"\0") + b"0000644\0" b"0000000\0" b"0000000\0" + b"%011o\0" % len(data)
                  + b"00000000000\0" + b" " * 8 + b"0" + bytes(100) + b"ustar\x0000" + bytes(247))
    h[148:155] = b"%06o\0" % sum(h)  # the checksum, counted with its own field as spaces
    return bytes(h) + data + bytes(-len(data) % 512)


def write_rows(out_dir: str, name: str, rows: list[list[Doc]], source=b"") -> tuple[str, list[int]]:
    """Rows of Docs -> out_dir/name.tar, atomically (an image given as a slice is read from `source`); sft.py's too."""
    path, tmp, offsets = os.path.join(out_dir, name + ".tar"), os.path.join(out_dir, f".{name}.tar.tmp"), []
    with open(tmp, "wb") as f:
        for r, ds in enumerate(rows):  # ds: the row's documents
            offsets.append(f.tell())
            meta = {"doc_lengths": [len(d.ids) for d in ds], "keys": [d.key for d in ds], "uids": [d.uid for d in ds]}
            f.write(tar_member(f"{r:06d}.json", json.dumps(meta).encode()))
            labels = None if all(d.labels is None for d in ds) else [t for d in ds for t in d.labels or d.ids]
            for member, values in (("input_ids", [t for d in ds for t in d.ids]), ("labels", labels)):
                if values is not None:  # labels: SFT rows only
                    np.lib.format.write_array(buf := io.BytesIO(), np.array(values, np.int32), allow_pickle=False)
                    f.write(tar_member(f"{r:06d}.{member}.npy", buf.getvalue()))
            for j, (ext, image) in enumerate(im for d in ds for im in d.images):
                f.write(tar_member(f"{r:06d}.{j:04d}.{ext}", source[image] if isinstance(image, slice) else image))
        f.write(bytes(1024))  # end of archive
    os.replace(tmp, path)  # atomic; after a crash a torn tar fails the size check against its stats
    return path, offsets


def pack_shard(src: str, out_dir: str, name: str, cfg: PackConfig, tok: Tokenizer, settings: dict) -> dict:
    """Pack one input shard into out_dir/name.tar, then write out_dir/name.stats.json. Returns the stats."""
    T, C = cfg.image_tokens, cfg.seq_len
    samples, counts, broken = [], Counter(), None  # per sample read: its Doc, or the reason it is skipped
    for key, members in read_tar(src):
        if isinstance(members, str):  # the tar broke here
            broken = members
            print(f"pack: {src}: broken tar ({broken}); kept the samples before it", file=sys.stderr)
            if key is None:
                continue
        d = "truncated_tar" if broken else read_doc(key, members, tok, counts)
        if not isinstance(d, str) and len(d.ids) + (T - 1) * len(d.images) > C:  # truncate, or drop as too_long
            d.ids = fit(d.ids, T, C, tok.eos_id)
            d.images = d.images[: d.ids.count(IMAGE_ID)] if cfg.long == "truncate" else []
            counts["truncated_docs"] += bool(d.images)
            d = d if d.images else "too_long"
        samples.append(d)
    # every sample read is packed or counted as skipped: samples_in == docs_out + sum(skipped), by construction
    docs, skipped = [d for d in samples if not isinstance(d, str)], Counter(d for d in samples if isinstance(d, str))

    lengths = [len(d.ids) + (T - 1) * len(d.images) for d in docs]
    rows = PACKERS[cfg.method](lengths, C)  # rows come out by their longest document: shuffle, by a fixed hash
    rows = [rows[r] for r in sorted(range(len(rows)), key=lambda r: hashlib.sha1(f"{name}/{r}".encode()).digest())]
    with _mapped(src) as source:
        path, offsets = write_rows(out_dir, name, [[docs[i] for i in row] for row in rows], source)
    stats = {"source": src, "samples_in": len(samples), "docs_out": len(docs), "rows": len(rows),
             "tokens": sum(lengths), "fill": sum(lengths) / (len(rows) * C) if rows else 0.0,
             "skipped": dict(sorted(skipped.items())), "truncated_docs": counts["truncated_docs"],
             "images": sum(len(d.images) for d in docs), "dropped_images": counts["dropped_images"],
             "broken_tar": broken, **settings, "bytes": os.path.getsize(path), "row_offsets": offsets,
             "row_tokens": [sum(lengths[i] for i in row) for row in rows]}
    write_json(os.path.join(out_dir, name + ".stats.json"), stats)
    return stats


# ---------------------------------------------------------------------------------------------------------------------
# Reading packed rows (train.py)


def _shard_stats(tar_path: str) -> dict | None:
    """A shard's stats if it is finished: its stats file exists, and its tar has the size the stats recorded."""
    try:
        with open(tar_path.removesuffix(".tar") + ".stats.json") as f:
            stats = json.load(f)
        return stats if os.path.getsize(tar_path) == stats["bytes"] else None
    except (OSError, ValueError, KeyError):
        return None


def packed_shards(out_dir: str) -> list[tuple[str, int]]:
    """[(tar path, number of rows)] of every finished shard in out_dir, sorted by name."""
    paths = sorted(glob.glob(os.path.join(glob.escape(out_dir), "*.stats.json")))
    return [(p, s["rows"]) for p in (p.removesuffix(".stats.json") + ".tar" for p in paths)
            if (s := _shard_stats(p)) is not None]


def iter_rows(shard_path: str, start: int = 0):
    """Rows of one finished shard from row `start` on (a seek, not a scan): dicts with input_ids (int32 array), labels
    (int32; pre-training rows have none on disk: their ids), doc_lengths, keys, uids, images (bytes), shard and row."""
    stats, name = _shard_stats(shard_path), os.path.basename(shard_path)
    if stats is None:
        raise FileNotFoundError(f"{shard_path} is not a finished packed shard")
    if start >= stats["rows"]:
        return
    for row, (_, members) in enumerate(read_tar(shard_path, stats["row_offsets"][start]), start):
        if isinstance(members, str):
            raise ValueError(f"{shard_path}: broken at row {row}: {members}")
        m = {ext: data for ext, (data, _) in members.items()}
        meta, ids = json.loads(m.pop("json")), np.load(io.BytesIO(m.pop("input_ids.npy")), allow_pickle=False)
        labels = np.load(io.BytesIO(m.pop("labels.npy")), allow_pickle=False) if "labels.npy" in m else ids
        images = [m[e] for e in sorted(m, key=lambda e: int(e.partition(".")[0]))]
        if len({sum(meta["doc_lengths"]), len(ids), len(labels)}) > 1 or int((ids == IMAGE_ID).sum()) != len(images):
            raise ValueError(f"{shard_path}: row {row} is inconsistent")
        yield {"input_ids": ids, "labels": labels, **meta, "images": images, "shard": name, "row": row}


def read_packed(out_dir: str):
    """Every row of every finished shard in out_dir: shards in name order, rows in order."""
    return (row for path, _ in packed_shards(out_dir) for row in iter_rows(path))


# ---------------------------------------------------------------------------------------------------------------------
# Command line: one worker process per shard, progress, totals

_tokenizer = functools.cache(Tokenizer)  # per process: loaded once per path


def _pack_one(job):
    src, name, cfg, settings = job
    warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # check_image refuses those images itself
    return pack_shard(src, cfg.output, name, cfg, _tokenizer(cfg.tokenizer), settings)


def main(argv: list[str] | None = None) -> dict:
    cfg = parse_config(PackConfig, argv)
    if not (cfg.input and cfg.output and os.path.exists(cfg.tokenizer)):
        raise SystemExit(f"pack: --input, --output and an existing --tokenizer are required (got {cfg.tokenizer!r})")
    if cfg.method not in PACKERS or cfg.long not in ("truncate", "drop"):
        raise SystemExit(f"pack: --method is one of {list(PACKERS)}; --long is truncate or drop")
    if cfg.image_tokens < 1 or cfg.seq_len < cfg.image_tokens + 3:
        raise SystemExit("pack: --seq-len must hold one image plus <s>, a newline and the EOS")
    sources = resolve_inputs(cfg.input)
    names, out = output_names(sources), cfg.output
    if len(set(names)) < len(names) or any(os.path.dirname(s) == os.path.abspath(out) for s in sources):
        raise SystemExit("pack: two inputs map to one output name, or an input is inside --output")
    os.makedirs(out, exist_ok=True)
    for p in glob.glob(os.path.join(glob.escape(out), ".*.tmp")):
        os.remove(p)  # left by a killed run
    # what the output depends on besides the input: a rerun must not mix shards packed differently
    vocab, tok_file = len(Tokenizer(cfg.tokenizer)), os.path.join(cfg.tokenizer, "tokenizer.json")
    with open(tok_file if os.path.isdir(cfg.tokenizer) else cfg.tokenizer, "rb") as f:
        settings = {"seq_len": cfg.seq_len, "image_tokens": cfg.image_tokens, "method": cfg.method, "long": cfg.long,
                    "vocab_size": vocab, "tokenizer_sha256": hashlib.sha256(f.read()).hexdigest()}
    finished = {n: _shard_stats(os.path.join(out, n + ".tar")) for n in names}  # None: still to do
    if other := [n for n, s in finished.items() if s is not None and any(s.get(k) != v for k, v in settings.items())]:
        raise SystemExit(f"pack: {out}/{other[0]} was packed with other settings than {settings}; use a new --output")
    todo = [(src, name, cfg, settings) for src, name in zip(sources, names) if finished[name] is None]
    if extra := {p for p, _ in packed_shards(out)} - {os.path.join(out, n + ".tar") for n in names}:
        print(f"pack: warning: {len(extra)} finished shards in {out} are not from these inputs; read_packed "
              "reads them too", file=sys.stderr)
    if todo and os.path.exists(os.path.join(out, "stats.json")):
        os.remove(os.path.join(out, "stats.json"))  # it describes a finished run; this one is not, yet
    workers = max(1, min(cfg.workers or len(os.sched_getaffinity(0)), len(todo)))
    print(f"pack: {len(sources)} shards, {len(sources) - len(todo)} already done, {workers} workers", file=sys.stderr)
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core per worker: the processes are the parallelism
    t0, samples = time.time(), 0
    with multiprocessing.Pool(workers) if workers > 1 else nullcontext() as pool:  # one worker: this process
        for done, stats in enumerate(pool.imap_unordered(_pack_one, todo) if pool else map(_pack_one, todo), 1):
            samples, dt = samples + stats["samples_in"], time.time() - t0
            print(f"pack: {done}/{len(todo)} shards, {samples / dt:,.0f} samples/s, "
                  f"ETA {dt / done * (len(todo) - done) / 60:.1f} min", file=sys.stderr,
                  end="\r" if sys.stderr.isatty() and done < len(todo) else "\n")
    shards = [_shard_stats(os.path.join(out, n + ".tar")) for n in names]
    total = {k: sum(s[k] for s in shards) for k in ("samples_in", "docs_out", "rows", "tokens", "images",
                                                    "truncated_docs", "dropped_images")}
    skipped = sum((Counter(s["skipped"]) for s in shards), Counter())
    total.update(fill=total["tokens"] / (total["rows"] * cfg.seq_len) if total["rows"] else 0.0,
                 skipped=dict(sorted(skipped.items())), shards=len(names),
                 broken_tars=[s["source"] for s in shards if s["broken_tar"]], **settings)
    write_json(os.path.join(out, "stats.json"), total)
    print(f"pack: {total['samples_in']:,} samples -> {total['docs_out']:,} documents ({total['truncated_docs']:,} "
          f"truncated) in {total['rows']:,} rows of {cfg.seq_len}, fill {total['fill']:.2%}; skipped "
          f"{sum(skipped.values()):,}: {dict(skipped)}; broken tars: {total['broken_tars'] or 'none'}")
    return total


if __name__ == "__main__":
    main()
