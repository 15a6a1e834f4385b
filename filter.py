"""
Data filtering (reference.md §4; formats.md §3 MLM-Filter, §5 DataComp uids): score image-text pairs with SigLIP
(`score`) and with the MLM-Filter judge (`mlm`), choose samples by score and by DataComp uid lists (`select`), copy
them into new shards (`reshard`). `train` makes a small SigLIP for the toy world, where no pretrained one exists.

    python filter.py train --out runs/siglip-toy                            # on the toy world's pool
    python filter.py score --input cache/toyworld/pool --model runs/siglip-toy --out runs/scores
    python filter.py select --scores runs/scores --top-fraction 0.9 --status success --out runs/keep.npy
    python filter.py reshard --input cache/toyworld/pool --uids runs/keep.npy --out runs/filtered
    torchrun --nproc_per_node=8 filter.py mlm --input '/data/datacomp/{00000000..00012895}.tar' \\
        --model weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o --out /data/scores/su
    python filter.py select --scores /data/scores/su:85 --status success --uids dfn.npy --union --out keep.npy

score/mlm write one SCORES/NAME.jsonl per input shard (NAME as pack.py names outputs), one line per sample, errors
included. Under torchrun, rank r takes shards r, r + world, ... (RANK/WORLD_SIZE span all nodes); batches never cross
shards, so the lines do not depend on the number of processes. Every output is written under a temporary name and
renamed: a rerun skips finished shards and redoes the rest.
"""
from __future__ import annotations

import glob
import hashlib
import json
import math
import multiprocessing
import os
import re
import string
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

import model as M
import pack
import weights as W

# -----------------------------------------------------------------------------------------------------------------
# Samples, decoded in DataLoader workers


def read_samples(path: str):
    """Every sample of a shard: key, uid, status, caption, image bytes and error (None, or why it cannot be scored).
    A tar that breaks ends with one error line for the sample it broke in; nothing after it can be read."""
    for key, members in pack.read_tar(path):
        if isinstance(members, str):
            if key is not None:
                yield dict(key=key, uid=None, status=None, caption=None, image=None, error=f"broken tar: {members}")
            return
        try:
            meta = json.loads(members["json"][0]) if "json" in members else {}
        except ValueError:
            meta = {}
        meta = meta if isinstance(meta, dict) else {}
        s = dict(key=key, uid=meta.get("uid"), status=meta.get("status"), caption=None, image=None, error=None)
        image = next((members[e][0] for e in pack.IMAGE_EXTS if e in members), None)
        try:
            s["caption"] = members["txt"][0].decode("utf-8") if "txt" in members else None
        except UnicodeDecodeError:
            s["error"] = "bad caption: not utf-8"
        if image is None:
            s["error"] = "missing image"
        elif s["error"] is None and s["caption"] is None:
            s["error"] = "missing caption"
        elif s["error"] is None and not s["caption"].strip():
            s["error"] = "empty caption"
        s["image"] = image
        yield s


class ShardBatches(torch.utils.data.IterableDataset):
    """A shard as batches of (rows, uint8 pixels of the rows without error). Worker w of W decodes batches w, w + W,
    ...; the DataLoader takes them round-robin, so batches come out in shard order whatever the worker count."""

    def __init__(self, path: str, batch_size: int, image_size: int):
        self.path, self.batch_size, self.image_size = path, batch_size, image_size

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        w, n = (info.id, info.num_workers) if info else (0, 1)
        batch, b = [], 0
        for s in read_samples(self.path):
            batch.append(s)
            if len(batch) == self.batch_size:
                if b % n == w:
                    yield self.decode(batch)
                batch, b = [], b + 1
        if batch and b % n == w:
            yield self.decode(batch)

    def decode(self, rows):
        pixels = []
        for s in rows:
            if s["error"] is None:
                try:
                    pixels.append(M.image_to_uint8(M.load_image(s["image"], s["key"]), self.image_size))
                except Exception as e:  # PIL raises many kinds for a broken file; all mean the same here
                    s["error"] = f"broken image: {type(e).__name__}: {str(e)[:200]}"
            s["image"] = None  # not sent back to the main process
        size = (0, 3, self.image_size, self.image_size)
        return rows, torch.stack(pixels) if pixels else torch.zeros(size, dtype=torch.uint8)


def shard_batches(path: str, batch_size: int, image_size: int, workers: int):
    return torch.utils.data.DataLoader(ShardBatches(path, batch_size, image_size), batch_size=None,
                                       num_workers=workers, prefetch_factor=4 if workers else None)


# -----------------------------------------------------------------------------------------------------------------
# SigLIP text preprocessing, equal to transformers' SiglipProcessor(text, padding="max_length", max_length=64,
# truncation=True): the text tower pools the last position, so the padding is part of the score.

SPIECE = "\u2581"  # SentencePiece's word marker
NO_PUNCT = str.maketrans("", "", string.punctuation)


def _token(cfg: dict, name: str, default):
    v = cfg.get(name, default)
    return v["content"] if isinstance(v, dict) else v


class TextTokenizer:
    """A SigLIP checkpoint's tokenizer: `spiece.model` as transformers' SiglipTokenizer runs it (lower-case, ASCII
    punctuation removed, whitespace collapsed, `</s>` appended, padded with `</s>`), or a `tokenizer.json` run as it
    says (its normalizer and post-processor), padded with tokenizer_config.json's pad token. Both truncate to
    `length` keeping the closing special token, as truncation=True does."""

    def __init__(self, src: str, length: int = 64, pad: str | None = None):
        d = src if os.path.isdir(src) else os.path.dirname(src)
        cfg_path, self.length, self.sp = os.path.join(d, "tokenizer_config.json"), length, None
        cfg = json.load(open(cfg_path)) if os.path.isfile(cfg_path) else {}
        if os.path.isfile(sp := os.path.join(d, "spiece.model") if os.path.isdir(src) else src) and sp.endswith(
                ".model"):
            import sentencepiece
            self.sp = sentencepiece.SentencePieceProcessor(model_file=sp)
            self.lower = cfg.get("do_lower_case", True)
            if cfg.get("additional_special_tokens"):
                raise ValueError(f"{cfg_path}: additional_special_tokens are not supported")
            eos, self.unk, pad = (_token(cfg, k, v) for k, v in (("eos_token", "</s>"), ("unk_token", "<unk>"),
                                                                  ("pad_token", "</s>")))
            self.special = {t: self.sp.piece_to_id(t) for t in (eos, self.unk, pad)}
            self.split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len)[::-1])) + ")")
            self.unk_len = len(self.sp.encode(self.unk, out_type=str))
            self.eos_id, self.pad_id = self.special[eos], self.special[pad]
        elif os.path.isfile(tj := os.path.join(d, "tokenizer.json") if os.path.isdir(src) else src):
            import tokenizers
            self.tok = tokenizers.Tokenizer.from_file(tj)
            pad = pad or _token(cfg, "pad_token", None)
            if pad is None or self.tok.token_to_id(pad) is None:
                raise ValueError(f"{d}: no pad token in tokenizer_config.json, or it is not in {tj}")
            self.pad_id, self.pad = self.tok.token_to_id(pad), pad
            self.tok.enable_truncation(length)
            self.tok.enable_padding(length=length, pad_id=self.pad_id, pad_token=pad)
        else:
            raise FileNotFoundError(f"{src}: no spiece.model or tokenizer.json")
        self.vocab_size = self.sp.get_piece_size() if self.sp else self.tok.get_vocab_size()

    def _pieces(self, text: str) -> list[str]:  # SiglipTokenizer._tokenize: canonicalize, then encode after <unk>
        text = re.sub(r"\s+", " ", (text.lower() if self.lower else text).translate(NO_PUNCT)).strip()
        pieces = self.sp.encode(self.unk + text, out_type=str)  # the prefix stops SentencePiece eating the marker
        return pieces[self.unk_len:] if len(pieces) >= self.unk_len else pieces

    def encode(self, text: str) -> list[int]:
        if self.sp is None:
            return self.tok.encode(text).ids
        parts = self.split.split(SPIECE + text.replace(SPIECE, " "))  # odd parts: special tokens, which strip the
        for i in range(1, len(parts), 2):  # spaces beside them (lstrip/rstrip) and are never split
            parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
        pieces = [p for i, part in enumerate(parts) for p in ([part] if i % 2 else self._pieces(part) if part else [])]
        if len(pieces) > 1 and pieces[0] == SPIECE and pieces[1] in self.special:
            pieces = pieces[1:]
        ids = [self.special[p] if p in self.special else self.sp.piece_to_id(p) for p in pieces][: self.length - 1]
        ids += [] if ids and ids[-1] == self.eos_id else [self.eos_id]
        return ids + [self.pad_id] * (self.length - len(ids))


# -----------------------------------------------------------------------------------------------------------------
# score and mlm: per input shard, one jsonl line per sample


def device_dtype(precision: str):
    cuda = torch.cuda.is_available()
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    name = precision if precision != "auto" else "bf16" if cuda else "fp32"
    return dev, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


class Progress:
    def __init__(self, what: str, shards: int):
        self.what, self.shards, self.done, self.samples, self.t0 = what, shards, 0, 0, time.time()

    def step(self, samples: int, extra: str = ""):
        self.done, self.samples = self.done + 1, self.samples + samples
        dt = time.time() - self.t0
        print(f"{self.what}: {self.done}/{self.shards} shards, {self.samples:,} samples, {self.samples / dt:,.1f} "
              f"samples/s, ETA {dt / self.done * (self.shards - self.done) / 60:.1f} min{extra}", file=sys.stderr,
              flush=True)


def run_shards(what: str, inputs: list[str], out: str, settings: dict, score_shard) -> dict:
    """This rank's input shards -> out/NAME.jsonl each, skipping finished ones; settings.json pins what the lines
    depend on, so a rerun with another model cannot mix its lines in. Returns this rank's counts."""
    sources = pack.resolve_inputs(inputs)
    names, (rank, world) = pack.output_names(sources), (int(os.environ.get(k, d)) for k, d in (("RANK", 0),
                                                                                                 ("WORLD_SIZE", 1)))
    os.makedirs(out, exist_ok=True)
    pinned = os.path.join(out, "settings.json")
    if os.path.isfile(pinned) and json.load(open(pinned)) != settings:
        raise SystemExit(f"{what}: {out} holds lines made with {json.load(open(pinned))}, not {settings}")
    M.write_json(pinned, settings)
    todo = [(s, n) for i, (s, n) in enumerate(zip(sources, names))
            if i % world == rank and not os.path.isfile(os.path.join(out, n + ".jsonl"))]
    print(f"{what}: rank {rank}/{world}: {len(todo)} shards to do of {len(sources)}", file=sys.stderr)
    counts, progress = Counter(), Progress(f"{what} rank {rank}", len(todo))
    for src, name in todo:
        lines = score_shard(src)
        path = os.path.join(out, name + ".jsonl")
        with open(tmp := os.path.join(out, f".{name}.jsonl.tmp"), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(tmp, path)
        errors = Counter(line["error"].split(":")[0] for line in lines if line["error"])
        counts.update(lines=len(lines), **{f"error {k}": v for k, v in errors.items()})
        progress.step(len(lines))
    print(f"{what}: rank {rank}: {dict(counts)}", file=sys.stderr)
    return dict(counts)


@dataclass
class ScoreConfig:
    """SigLIP image-text scores: cosine similarity and sigmoid match probability, one line per sample."""
    input: list[str] = field(default_factory=list)  # shards: files, dirs, globs, {a..b} (pack.py's patterns)
    model: str = ""  # SigLIP checkpoint in HF layout (local dir or hub id) with spiece.model or tokenizer.json
    out: str = ""  # SCORES dir
    batch_size: int = 64
    workers: int = 2  # image-decoding processes
    text_len: int = 64  # SiglipProcessor's max_length
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32


def score(cfg: ScoreConfig) -> dict:
    if not (cfg.input and cfg.model and cfg.out):
        raise SystemExit("score: --input, --model and --out are required")
    dev, dtype = device_dtype(cfg.precision)
    d = W.resolve(cfg.model, ("*.json", "*.safetensors", "spiece.model"))
    net, tok = W.load_siglip(d, dtype=dtype).to(dev).eval(), TextTokenizer(d, cfg.text_len)
    size = net.vision.config.image_size

    @torch.no_grad()
    def score_shard(src):
        lines = []
        for rows, px in shard_batches(src, cfg.batch_size, size, cfg.workers):
            ok = [r for r in rows if r["error"] is None]
            if ok:
                ids = torch.tensor([tok.encode(r["caption"]) for r in ok], device=dev)
                i = F.normalize(net.image_embeds(M.normalize_pixels(px.to(dev), dtype)).float(), dim=-1)
                t = F.normalize(net.text_embeds(ids).float(), dim=-1)
                cos = (i * t).sum(-1)
                prob = torch.sigmoid(cos * net.logit_scale.float().exp() + net.logit_bias.float())
                got = iter(zip(cos.tolist(), prob.tolist()))
            for r in rows:
                s, p = next(got) if r["error"] is None else (None, None)
                lines.append(dict(key=r["key"], uid=r["uid"], score=s, prob=p, status=r["status"], error=r["error"]))
        return lines

    return run_shards("score", cfg.input, cfg.out, {"command": "score", "model": cfg.model,
                                                     "text_len": cfg.text_len}, score_shard)


# MLM-Filter (formats.md §3.4-3.5), byte for byte: the qwen_instruct conversation around the v2 instruction template.
MLM_TEMPLATE = """Text Caption: {caption}

{criteria} A higher score indicates higher level of {aspect}. Ensure that your scoring is nuanced and uses the entire range from 0 to 100, reflecting the subtle differences. The score should be given as an integer, with each number between 0 and 100 considered as a potential score, avoiding the tendency to round to multiples of 5 or 10. Please first output a single line containing the value indicating the scores. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias."""  # noqa: E501
MLM_CRITERIA = {
    "image_text_matching": "Please evaluate if the provided text caption accurately represents the main features and objects of the image. The caption doesn't need to detail every aspect of the image, but it should capture its primary theme. Rate the overall quality of the text caption's match to the image on a scale of 1-100, considering the criteria mentioned.",  # noqa: E501
    "object_detail_fulfillment": "Please evaluate the text caption to determine if it provides detailed descriptions of objects that align with the image. Specifically, assess if the caption sufficiently describes the color, size, position, shape, material, etc., of the objects. Afterward, rate the caption's overall accuracy in capturing object details from the image on a scale of 1-100, based on the criteria provided.",  # noqa: E501
    "caption_text_quality": "Please evaluate the text caption based on the following criteria: Grammatical Correctness, Diversity of Vocabulary (e.g., the range and uniqueness of words used), Fluency (e.g., smoothness and natural flow of sentences), Readability, Length, and Structure. Assign an overall quality score on a scale of 1-100.",  # noqa: E501
    "semantic_understanding": """Evaluate the given text caption in relation to its corresponding image. Your goal is to determine if the text caption provides additional semantic information that isn't readily apparent just from the image itself.

For example:

1. If the image mentions "a man" but the caption elaborates he is a "homeless man" or a "businessman," then the caption is enriching the semantic context.
2. If the caption introduces concepts like the mathematical tangent function, which require in-depth knowledge to deduce, it is imparting external semantics.
3. Captions revealing specific location addresses, festival details, or other nuanced data not easy to infer from the image also provide external semantic information.
4. Directly identifying specific entities in the image such as buildings, people, bird species, animal breeds, car models, engines, etc., in the caption introduces additional insights.
5. Should the image act as a contextual backdrop and the caption describes elements not explicitly showcased in the image, it has semantic depth.
6. Lastly, if the caption depicts relationships between the subjects in the image, which need commonsense knowledge to understand, it should be considered semantically rich.

Please assess and determine the extent of semantic enrichment the caption provides over the image. Rate the text caption's semantic depth on a scale from 1 to 100.""",  # noqa: E501
}


def mlm_prompt(caption: str, metric: str) -> str:
    """The string the reference feeds its tokenizer: MPT-style qwen_instruct (system without a period, no newline
    after <|im_end|>), the image first in the user turn, no <s>."""
    user = "<image>\n" + MLM_TEMPLATE.format(caption=caption, criteria=MLM_CRITERIA[metric],
                                             aspect=metric.replace("_", " "))
    return ("<|im_start|>system\nYou are a helpful assistant<|im_end|><|im_start|>user\n" + user
            + "<|im_end|><|im_start|>assistant\n")


def mlm_ids(tok, caption: str, metric: str) -> list[int]:
    """tokenizer_image_token: each chunk around <image> tokenized on its own (control tokens in the string are
    tokens, as in the reference), joined by IMAGE_ID, cut at 2040 ids; then the reference's appended space token."""
    chunks = [tok.encode(c).ids for c in mlm_prompt(caption, metric).split("<image>")]
    ids = [t for k, c in enumerate(chunks) for t in ([M.IMAGE_ID] if k else []) + c][:2040]
    return ids + [tok.encode(" ").ids[-1]]


def parse_score(text: str) -> int | None:
    """The reference's threshold parse (apply_filter.py): the first line, ',' then ';' stripped, int() or nothing."""
    try:
        return int(text.split("\n")[0].strip(",").strip(";"))
    except ValueError:
        return None


@dataclass
class MLMConfig:
    """MLM-Filter scores: the judge's 2 greedy tokens (raw) and their parsed integer, one line per sample."""
    input: list[str] = field(default_factory=list)
    model: str = ""  # the judge (weights.load_vlm: the released llava_qwen layout, local dir or hub id)
    out: str = ""
    metric: str = "semantic_understanding"  # or image_text_matching | object_detail_fulfillment | caption_text_quality
    batch_size: int = 16
    workers: int = 2
    precision: str = "auto"


def mlm(cfg: MLMConfig) -> dict:
    if not (cfg.input and cfg.model and cfg.out) or cfg.metric not in MLM_CRITERIA:
        raise SystemExit(f"mlm: --input, --model and --out are required; --metric is one of {list(MLM_CRITERIA)}")
    import tokenizers
    dev, dtype = device_dtype(cfg.precision)
    judge = W.load_vlm(cfg.model, dtype=dtype).to(dev).eval()
    if judge.tokenizer_path is None:
        raise SystemExit(f"mlm: {cfg.model} has no tokenizer")
    tok = tokenizers.Tokenizer.from_file(judge.tokenizer_path)  # control tokens in the prompt parse as tokens
    stop = [i for t in ("<|im_end|>", "<|endoftext|>") if (i := tok.token_to_id(t)) is not None]

    def score_shard(src):
        lines = []
        for rows, px in shard_batches(src, cfg.batch_size, judge.config.vision.image_size, cfg.workers):
            decoded = [k for k, r in enumerate(rows) if r["error"] is None]  # the rows px holds, in order
            for k in decoded:
                if "<image>" in rows[k]["caption"]:
                    rows[k]["error"] = "bad caption: contains <image>"  # it would ask for a second image
            keep = [k for k in decoded if rows[k]["error"] is None]
            px = px[[decoded.index(k) for k in keep]]
            # Pads are masked (VLM.generate): the reference attends to its left pads, so its scores can move with
            # the batch; ours do not. Greedy, 2 new tokens, stop at the end-of-turn tokens, special tokens skipped.
            new = judge.generate([mlm_ids(tok, rows[k]["caption"], cfg.metric) for k in keep],
                                 M.normalize_pixels(px.to(dev), dtype), max_new_tokens=2, stop_ids=stop) if keep else []
            raw = dict(zip(keep, (tok.decode(ids, skip_special_tokens=True) for ids in new)))
            for k, r in enumerate(rows):
                lines.append(dict(key=r["key"], uid=r["uid"], raw=raw.get(k), score=parse_score(raw[k]) if k in raw
                                  else None, status=r["status"], error=r["error"]))
        return lines

    return run_shards("mlm", cfg.input, cfg.out, {"command": "mlm", "model": cfg.model, "metric": cfg.metric},
                      score_shard)


# -----------------------------------------------------------------------------------------------------------------
# train: the toy world's stand-in for the pretrained SigLIP/DFN/CLIP scorers of real data


@dataclass
class TrainConfig:
    """Train a small SigLIP with the sigmoid loss on image-text shards; save it in HF SigLIP layout."""
    input: list[str] = field(default_factory=list)  # shards; default: the toy world's pool
    out: str = ""
    tokenizer: str = ""  # tokenizer.json or spiece.model; default: the toy world's tokenizer.json
    pad_token: str = "<|endoftext|>"  # for a tokenizer.json: pads the text to text_len
    steps: int = 1200
    batch_size: int = 256
    lr: float = 1e-3
    width: int = 128
    layers: int = 3
    image_size: int = 64
    patch_size: int = 8
    text_len: int = 64
    workers: int = 2
    seed: int = 0


def train(cfg: TrainConfig) -> dict:
    if not cfg.out:
        raise SystemExit("train: --out is required")
    if not cfg.input or not cfg.tokenizer:
        import toyworld
        world = toyworld.ensure()
        cfg.input, cfg.tokenizer = cfg.input or [os.path.join(world, "pool")], cfg.tokenizer or os.path.join(
            world, "tokenizer.json")
    tok = TextTokenizer(cfg.tokenizer, cfg.text_len, cfg.pad_token)
    pixels, ids, skipped = [], [], Counter()
    for src in pack.resolve_inputs(cfg.input):  # the whole set in memory: the toy pool is 20k x 64 px
        for rows, px in shard_batches(src, 512, cfg.image_size, cfg.workers):
            pixels.append(px)
            ids += [tok.encode(r["caption"]) for r in rows if r["error"] is None]
            skipped.update(r["error"].split(":")[0] for r in rows if r["error"])
    pixels, ids = torch.cat(pixels), torch.tensor(ids)
    print(f"train: {len(ids):,} pairs, skipped {dict(skipped)}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    w, L = cfg.width, cfg.layers
    net = M.Siglip(M.VisionConfig(cfg.image_size, cfg.patch_size, w, 2 * w, L, w // 32),
                   M.TextConfig(tok.vocab_size, w, 2 * w, L, w // 32, cfg.text_len, w))
    for name, p in net.named_parameters():  # as HF initializes SigLIP, roughly; t = log 10 and b = -10 (the paper)
        torch.nn.init.zeros_(p) if name.endswith("bias") else torch.nn.init.ones_(p) if p.dim() == 1 else \
            torch.nn.init.normal_(p, std=0.02)
    with torch.no_grad():
        net.logit_scale.fill_(math.log(10.0)), net.logit_bias.fill_(-10.0)
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.lr, weight_decay=0.1)
    gen, t0 = torch.Generator().manual_seed(cfg.seed), time.time()
    for step in range(1, cfg.steps + 1):
        for g in opt.param_groups:  # linear warmup over 5%, cosine to 0
            g["lr"] = cfg.lr * min(1, step / max(1, cfg.steps // 20)) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        pick = torch.randint(len(ids), (cfg.batch_size,), generator=gen)
        i = F.normalize(net.image_embeds(M.normalize_pixels(pixels[pick])), dim=-1)
        t = F.normalize(net.text_embeds(ids[pick]), dim=-1)
        logits = i @ t.T * net.logit_scale.exp() + net.logit_bias
        labels = 2 * torch.eye(len(pick)) - 1  # +1 on the diagonal (the pair), -1 elsewhere
        loss = -F.logsigmoid(labels * logits).sum() / len(pick)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps:
            dt = time.time() - t0
            print(f"train: step {step}/{cfg.steps} loss {loss.item():.3f} {step * len(pick) / dt:,.0f} pairs/s "
                  f"ETA {dt / step * (cfg.steps - step) / 60:.1f} min", file=sys.stderr, flush=True)
    pad = tok.pad if tok.sp is None else next(t for t, i in tok.special.items() if i == tok.pad_id)
    W.save_siglip(cfg.out, net, cfg.tokenizer, (pad, tok.pad_id), (pad, tok.pad_id) if tok.sp is None else
                  next((t, i) for t, i in tok.special.items() if i == tok.eos_id))
    return {"pairs": len(ids), "loss": loss.item(), "seconds": time.time() - t0}


# -----------------------------------------------------------------------------------------------------------------
# select: score lines and uid lists -> one sorted, de-duplicated DataComp uid array

UID = np.dtype("u8,u8")  # DataComp's 128-bit uid: (upper, lower) 64 bits, sorted lexicographically


def uid_pair(uid) -> tuple[int, int] | None:
    """A hex uid -> (upper, lower) as DataComp splits int(uid, 16); None if it is no hex number of <= 128 bits."""
    try:
        n = int(uid, 16)
    except (TypeError, ValueError):
        return None
    return divmod(n, 2**64) if 0 <= n < 2**128 else None


def load_uids(path: str) -> np.ndarray:
    """A DataComp subset file: .npy of dtype u8,u8, or raw 16-byte records (the resharder reads both)."""
    with open(path, "rb") as f:
        npy = f.read(6) == b"\x93NUMPY"
    a = np.load(path, mmap_mode="r") if npy else np.fromfile(path, dtype=UID)
    if a.dtype != UID:
        raise SystemExit(f"{path}: uid array has dtype {a.dtype}, expected u8,u8")
    return np.asarray(a)


@dataclass
class SelectConfig:
    """Keep samples by score threshold (--scores DIR:MIN), top fraction, status and uid lists; union or intersect."""
    scores: list[str] = field(default_factory=list)  # score/mlm output dirs, each DIR or DIR:MIN (keep score >= MIN)
    uids: list[str] = field(default_factory=list)  # DataComp uid files (.npy, u8,u8)
    top_fraction: float = 0.0  # keep the best round(F * scored lines) of each --scores source; 0 = off
    status: str = ""  # "success": keep only lines whose json status is this
    union: bool = False
    intersect: bool = False
    out: str = ""  # KEEP.npy; the summary goes to KEEP.json


def select(cfg: SelectConfig) -> dict:
    n_src = len(cfg.scores) + len(cfg.uids)
    if not cfg.out or not n_src or (cfg.union and cfg.intersect) or (n_src > 1 and not (cfg.union or cfg.intersect)):
        raise SystemExit("select: --out, at least one --scores/--uids, and with several sources --union or --intersect")
    if not 0 <= cfg.top_fraction <= 1:
        raise SystemExit("select: --top-fraction is in [0, 1]")
    sets, summary = [], []
    for spec in cfg.scores:
        d, _, m = spec.rpartition(":") if re.fullmatch(r".+:-?[\d.]+(e-?\d+)?", spec) else (spec, "", "")
        files = sorted(glob.glob(os.path.join(glob.escape(d), "*.jsonl")))
        if not files:
            raise SystemExit(f"select: no score files (*.jsonl) in {d}")
        lines = [json.loads(s) for f in files for s in open(f)]
        scored = [x for x in lines if x["error"] is None and x["score"] is not None]
        keep = [x for x in scored if (not m or x["score"] >= float(m)) and (not cfg.status or x["status"] == cfg.status)]
        if cfg.top_fraction:  # exactly round(F * n) of the n scored lines; ties broken by uid, then key
            best = sorted(scored, key=lambda x: (-x["score"], str(x["uid"]), x["key"]))
            top = {id(x) for x in best[: math.floor(cfg.top_fraction * len(scored) + 0.5)]}
            keep = [x for x in keep if id(x) in top]
        pairs = [p for x in keep if (p := uid_pair(x["uid"])) is not None]
        sets.append(np.unique(np.array(pairs, dtype=UID)))
        summary.append({"source": spec, "lines": len(lines), "errors": sum(x["error"] is not None for x in lines),
                        "scored": len(scored), "kept": len(keep), "kept_without_uid": len(keep) - len(pairs),
                        "unique_uids": len(sets[-1])})
    for path in cfg.uids:
        a = load_uids(path)
        sets.append(np.unique(a))
        summary.append({"source": path, "uids": len(a), "unique_uids": len(sets[-1])})
    union = np.unique(np.concatenate(sets))
    inter = sets[0]
    for s in sets[1:]:
        inter = np.intersect1d(inter, s)
    out = inter if cfg.intersect else union
    with open(tmp := cfg.out + ".tmp", "wb") as f:
        np.save(f, out)
    os.replace(tmp, cfg.out)
    total = {"sources": summary, "union": len(union), "intersection": len(inter), "kept": len(out),
             "mode": "intersect" if cfg.intersect else "union", "top_fraction": cfg.top_fraction, "status": cfg.status}
    M.write_json(cfg.out.removesuffix(".npy") + ".json", total)
    print(json.dumps(total, indent=1))
    return total


# -----------------------------------------------------------------------------------------------------------------
# reshard: the samples whose uid is in a uid file, copied byte for byte into shards of <= shard_size


@dataclass
class ReshardConfig:
    """Copy the samples whose json uid is in --uids into new shards {:08d}.tar of at most --shard-size samples."""
    input: list[str] = field(default_factory=list)
    uids: str = ""
    out: str = ""
    shard_size: int = 10000
    workers: int = 0  # processes; 0 = all cores


def plan_shard(job) -> dict:
    """One input shard -> its kept samples [key, [[ext, offset, size], ...]] and counts, cached in out/.plan."""
    src, name, uids_path, plan_dir = job
    path = os.path.join(plan_dir, name + ".json")
    if os.path.isfile(path):
        return json.load(open(path))
    uids, kept, n, errors = load_uids(uids_path), [], Counter(), Counter()
    for key, members in pack.read_tar(src):
        n["seen"] += key is not None
        if isinstance(members, str):
            errors["broken_tar"] += key is not None
            break
        try:
            pair = uid_pair(json.loads(members["json"][0]).get("uid")) if "json" in members else None
        except (ValueError, AttributeError):
            pair = None
        if pair is None:
            errors["no_uid"] += 1
            continue
        k = np.array([pair], dtype=UID)
        if np.searchsorted(uids, k, "right")[0] > np.searchsorted(uids, k, "left")[0]:  # listed (once or more)
            kept.append([key, [[ext, at, len(data)] for ext, (data, at) in members.items()]])
        else:
            n["dropped"] += 1
    plan = {"source": src, "seen": n["seen"], "kept": len(kept), "dropped": n["dropped"], "errors": dict(errors),
            "samples": kept}
    M.write_json(path, plan)
    return plan


def write_output(job) -> dict:
    """Output shard j from its slices [(source, plan path, start, end)] of the kept samples, in input order."""
    j, slices, out = job
    taken, renamed = set(), 0
    with open(tmp := os.path.join(out, f".{j:08d}.tar.tmp"), "wb") as f:
        for src, plan, a, b in slices:
            with pack._mapped(src) as buf:
                for key, members in json.load(open(plan))["samples"][a:b]:
                    new, k = key, 0
                    while new in taken:  # a key clash between sources: the next free key_N, the same on every run
                        k += 1
                        new = f"{key}_{k}"
                    taken.add(new)
                    renamed += new != key
                    for ext, at, size in members:
                        f.write(pack.tar_member(f"{new}.{ext}", buf[at: at + size]))
        f.write(bytes(1024))
    os.replace(tmp, path := os.path.join(out, f"{j:08d}.tar"))
    stats = {"shard": j, "samples": len(taken), "renamed": renamed, "bytes": os.path.getsize(path),
             "sources": sorted({os.path.basename(s) for s, *_ in slices})}
    M.write_json(os.path.join(out, f"{j:08d}_stats.json"), stats)
    return stats


def reshard(cfg: ReshardConfig) -> dict:
    if not (cfg.input and cfg.uids and cfg.out) or cfg.shard_size < 1:
        raise SystemExit("reshard: --input, --uids and --out are required; --shard-size >= 1")
    sources = pack.resolve_inputs(cfg.input)
    names, plan_dir = pack.output_names(sources), os.path.join(cfg.out, ".plan")
    os.makedirs(plan_dir, exist_ok=True)
    for p in glob.glob(os.path.join(glob.escape(cfg.out), ".*.tmp")) + glob.glob(os.path.join(plan_dir, ".*.tmp")):
        os.remove(p)  # left by a killed run
    settings = {"inputs": sources, "shard_size": cfg.shard_size,
                "uids_sha256": hashlib.sha256(open(cfg.uids, "rb").read()).hexdigest()}
    pinned = os.path.join(plan_dir, "settings.json")
    if os.path.isfile(pinned) and json.load(open(pinned)) != settings:
        raise SystemExit(f"reshard: {cfg.out} was made from other inputs, uids or shard size; use a new --out")
    M.write_json(pinned, settings)
    uids = np.unique(load_uids(cfg.uids))  # sorted and unique, whatever the file was: searchsorted needs it
    with open(os.path.join(plan_dir, ".uids.npy.tmp"), "wb") as f:
        np.save(f, uids)
    os.replace(os.path.join(plan_dir, ".uids.npy.tmp"), sorted_uids := os.path.join(plan_dir, "uids.npy"))
    workers, t0 = max(1, cfg.workers or len(os.sched_getaffinity(0))), time.time()
    with multiprocessing.Pool(workers) as pool:
        plans = pool.map(plan_shard, [(s, n, sorted_uids, plan_dir) for s, n in zip(sources, names)], chunksize=1)
        for p in plans:
            del p["samples"]  # the workers read them again from the plan files
        # kept sample g of all inputs goes to output shard g // shard_size: the numbering depends only on the inputs
        ends, S = np.cumsum([p["kept"] for p in plans]), cfg.shard_size
        jobs = []
        for j in range(-(-int(ends[-1]) // S) if len(ends) else 0):
            lo, hi, slices = j * S, min((j + 1) * S, int(ends[-1])), []
            for k, (src, name) in enumerate(zip(sources, names)):
                start = int(ends[k]) - plans[k]["kept"]
                if start < hi and ends[k] > lo:
                    slices.append((src, os.path.join(plan_dir, name + ".json"), max(lo, start) - start,
                                   min(hi, int(ends[k])) - start))
            done = os.path.join(cfg.out, f"{j:08d}_stats.json")
            if not (os.path.isfile(done) and json.load(open(done))["bytes"] == os.path.getsize(done[:-11] + ".tar")):
                jobs.append((j, slices, cfg.out))
        progress = Progress("reshard", len(jobs))
        for stats in pool.imap_unordered(write_output, jobs):
            progress.step(stats["samples"])
    shards = [json.load(open(p)) for p in sorted(glob.glob(os.path.join(glob.escape(cfg.out), "*_stats.json")))]
    errors = sum((Counter(p["errors"]) for p in plans), Counter())
    total = {"seen": sum(p["seen"] for p in plans), "kept": sum(p["kept"] for p in plans),
             "dropped": sum(p["dropped"] for p in plans), "errors": dict(errors), "shards": len(shards),
             "renamed": sum(s["renamed"] for s in shards), "uids_listed": len(uids),
             "seconds": time.time() - t0}
    assert total["seen"] == total["kept"] + total["dropped"] + sum(errors.values()), total
    assert sum(s["samples"] for s in shards) == total["kept"], "output shards do not hold every kept sample"
    M.write_json(os.path.join(cfg.out, "stats.json"), total)
    print(f"reshard: {total}", file=sys.stderr)
    return total


COMMANDS = {"train": (TrainConfig, train), "score": (ScoreConfig, score), "mlm": (MLMConfig, mlm),
            "select": (SelectConfig, select), "reshard": (ReshardConfig, reshard)}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: filter.py {{{','.join(COMMANDS)}}} --help")
    cls, run = COMMANDS[argv[0]]
    return run(M.parse_config(cls, argv[1:]))


if __name__ == "__main__":
    main()
