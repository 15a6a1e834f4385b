"""
Data filtering (reference.md §4; formats.md §3 MLM-Filter, §5 DataComp uids): SigLIP scores (`score`) and MLM-Filter
scores (`mlm`) per sample, selection by scores and DataComp uid lists (`select`), a byte-exact copy of the selected
samples into new shards (`reshard`), and `train`, the toy world's SigLIP (no pretrained one exists for it).

    python filter.py train --out runs/siglip-toy && python filter.py score --input cache/toyworld/pool \
        --model runs/siglip-toy --out runs/scores && python filter.py select --scores runs/scores --top-fraction 0.9 \
        --out runs/keep.npy && python filter.py reshard --input cache/toyworld/pool --uids runs/keep.npy --out runs/f
    torchrun --nproc_per_node=8 filter.py mlm --input '/data/dc/{00000000..00012895}.tar' --out /data/su \
        --model weizhiwang/mlm-filter-qwen2.5-1.5b-gpt4o   # then: select --scores /data/su:85 --uids dfn.npy --union

score/mlm write SCORES/NAME.jsonl per input shard (NAME as pack.py's), one line per sample, errors included. Rank r
of torchrun (RANK/WORLD_SIZE, across nodes too) takes shards r, r + world, ...; batches never cross shards, so lines
do not depend on the process count. Every output is written to a temp name and renamed: a rerun resumes.
"""
from __future__ import annotations

import functools
import glob
import hashlib
import itertools
import json
import math
import multiprocessing
import os
import re
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
        image = next((members[e][0] for e in pack.IMAGE_EXTS if e in members), None)
        caption = members["txt"][0].decode("utf-8", "replace") if "txt" in members else None
        error = "missing image" if image is None else "missing caption" if caption is None else \
            "empty caption" if not caption.strip() else None
        yield dict(key=key, uid=meta.get("uid"), status=meta.get("status"), caption=caption, image=image, error=error)


class ShardBatches(torch.utils.data.IterableDataset):
    """A shard as batches of (rows, uint8 pixels of the rows without error). Worker w of W decodes batches w, w + W,
    ...; the DataLoader takes them round-robin, so batches come out in shard order whatever the worker count."""

    def __init__(self, path: str, batch_size: int, image_size: int):
        self.path, self.batch_size, self.image_size = path, batch_size, image_size

    def __iter__(self):
        info, samples = torch.utils.data.get_worker_info(), read_samples(self.path)
        w, n = (info.id, info.num_workers) if info else (0, 1)
        for b in itertools.count():
            if not (batch := list(itertools.islice(samples, self.batch_size))):
                return
            if b % n == w:
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
        return rows, torch.stack(pixels) if pixels else torch.zeros(0, 3, self.image_size, self.image_size).byte()


def shard_batches(path: str, batch_size: int, image_size: int, workers: int):
    return torch.utils.data.DataLoader(ShardBatches(path, batch_size, image_size), batch_size=None,
                                       num_workers=workers, prefetch_factor=4 if workers else None)


# -----------------------------------------------------------------------------------------------------------------
# score and mlm: per input shard, one jsonl line per sample


class SiglipTokenizer:
    """= SiglipProcessor(text, padding="max_length", max_length=length, truncation=True), from spiece.model or
    tokenizer.json: SigLIP's text tower pools the last (pad) position, so the padding is part of every score."""

    def __init__(self, src: str, length: int = 64, pad: str | None = None):
        import re
        d = src if os.path.isdir(src) else os.path.dirname(src)
        cfg = json.load(open(p)) if os.path.isfile(p := os.path.join(d, "tokenizer_config.json")) else {}
        token = lambda k, v: x["content"] if isinstance(x := cfg.get(k, v), dict) else x  # noqa: E731
        self.length, self.sp, self.pad = length, None, (pad := pad or token("pad_token", "</s>"))
        if os.path.isdir(src) and os.path.isfile(sp := os.path.join(d, "spiece.model")):
            import sentencepiece
            self.sp, self.lower = sentencepiece.SentencePieceProcessor(model_file=sp), cfg.get("do_lower_case", True)
            eos, self.unk = token("eos_token", "</s>"), token("unk_token", "<unk>")
            self.no_punct = str.maketrans("", "", r"""!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~""")  # string.punctuation
            self.special = {t: self.sp.piece_to_id(t) for t in (eos, self.unk, self.pad)}  # split out with their spaces
            self.split = re.compile(r"\s*(" + "|".join(map(re.escape, sorted(self.special, key=len)[::-1])) + r")\s*")
            self.unk_len, self.eos_id = len(self.sp.encode(self.unk, out_type=str)), self.special[eos]
        else:
            import tokenizers
            self.tok = tokenizers.Tokenizer.from_file(os.path.join(d, "tokenizer.json") if d == src else src)
            if (pad_id := self.tok.token_to_id(self.pad)) is None:
                raise ValueError(f"{src}: pad token {self.pad!r} (tokenizer_config) is not in tokenizer.json")
            self.tok.enable_truncation(length), self.tok.enable_padding(length=length, pad_id=pad_id, pad_token=pad)
        self.pad_id = self.special[self.pad] if self.sp else pad_id

    def encode(self, text: str) -> list[int]:
        if self.sp is None:
            return self.tok.encode(text).ids
        pieces = []
        for i, part in enumerate(self.split.split("\u2581" + text.replace("\u2581", " "))):  # odd: special tokens
            canon = " ".join((part.lower() if self.lower else part).translate(self.no_punct).split())
            got = [part] if i % 2 else self.sp.encode(self.unk + canon, out_type=str) if part else []  # after <unk>:
            pieces += got[self.unk_len:] if i % 2 == 0 and len(got) >= self.unk_len else got  # the marker survives
        pieces = pieces[1:] if len(pieces) > 1 and pieces[0] == "\u2581" and pieces[1] in self.special else pieces
        ids = [self.special[t] if t in self.special else self.sp.piece_to_id(t) for t in pieces][: self.length - 1]
        ids += [] if ids and ids[-1] == self.eos_id else [self.eos_id]
        return ids + [self.pad_id] * (self.length - len(ids))


def device_dtype(precision: str):
    cuda = torch.cuda.is_available()
    dev = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}" if cuda else "cpu")
    name = precision if precision != "auto" else "bf16" if cuda else "fp32"
    return dev, {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]


def progress(what: str, done: int, total: int, samples: int, t0: float):
    dt = time.time() - t0
    print(f"{what}: {done}/{total} shards, {samples:,} samples, {samples / dt:,.1f} samples/s, ETA "
          f"{dt / done * (total - done) / 60:.1f} min", file=sys.stderr, flush=True)


@dataclass
class ScoreConfig:  # score's flags, and mlm's
    """SigLIP image-text scores: cosine similarity and sigmoid match probability, one line per sample."""
    input: list[str] = field(default_factory=list)  # shards: files, dirs, globs, {a..b} (pack.py's patterns)
    model: str = ""  # score: SigLIP in HF layout with spiece.model or tokenizer.json; mlm: the judge (load_vlm)
    out: str = ""  # SCORES dir
    batch_size: int = 64  # samples per forward
    workers: int = 2  # image-decoding processes
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp16 | fp32


def run_shards(what: str, cfg, settings: dict, image_size: int, fields: tuple, score_batch) -> dict:
    """This rank's unfinished shards -> out/NAME.jsonl each; score_batch(rows, pixels) gives `fields` (or an error)
    per decoded row. settings.json pins what lines depend on: a rerun with another model cannot mix in."""
    if not (cfg.input and cfg.model and cfg.out):
        raise SystemExit(f"{what}: --input, --model and --out are required")
    sources, out = pack.resolve_inputs(cfg.input), cfg.out
    names, rank, world = pack.output_names(sources), int(os.environ.get("RANK", 0)), int(os.getenv("WORLD_SIZE", 1))
    os.makedirs(out, exist_ok=True)
    if os.path.isfile(pinned := os.path.join(out, "settings.json")) and json.load(open(pinned)) != settings:
        raise SystemExit(f"{what}: {out} holds lines made with {json.load(open(pinned))}, not {settings}")
    if rank == 0:  # one writer: ranks sharing one temp name would race
        M.write_json(pinned, settings)
    todo = [(s, n) for i, (s, n) in enumerate(zip(sources, names))
            if i % world == rank and not os.path.isfile(os.path.join(out, n + ".jsonl"))]
    counts, t0 = Counter(), time.time()
    for done, (src, name) in enumerate(todo, 1):
        lines = []
        for rows, px in shard_batches(src, cfg.batch_size, image_size, cfg.workers):
            ok = [r for r in rows if r["error"] is None]
            got = iter(score_batch(ok, px) if ok else [])
            for r in rows:
                line = {"key": r["key"], "uid": r["uid"], **dict.fromkeys(fields), "status": r["status"],
                        "error": r["error"]}
                lines.append({**line, **next(got)} if r["error"] is None else line)
        with open(tmp := os.path.join(out, f".{name}.jsonl.tmp"), "w") as f:
            f.writelines(json.dumps(line) + "\n" for line in lines)
        os.replace(tmp, os.path.join(out, name + ".jsonl"))
        counts.update(["lines"] * len(lines) + [x["error"].split(":")[0] for x in lines if x["error"]])
        progress(f"{what} rank {rank}/{world}", done, len(todo), counts["lines"], t0)
    print(f"{what}: rank {rank}: {len(todo)} shards, {dict(counts)}", file=sys.stderr)
    return dict(counts)


def score(cfg: ScoreConfig) -> dict:
    dev, dtype = device_dtype(cfg.precision)
    d = W.resolve(M.need(cfg.model, "--model is a SigLIP in HF layout (toy: python filter.py train --out DIR)",
                         "config.json", True), ("*.json", "*.safetensors", "spiece.model"))
    net, tok = W.load_siglip(d, dtype=dtype).to(dev).eval(), SiglipTokenizer(d, 64)  # SiglipProcessor's max_length

    @torch.no_grad()
    def score_batch(rows, px):
        ids = torch.tensor([tok.encode(r["caption"]) for r in rows], device=dev)
        i = F.normalize(net.image_embeds(M.normalize_pixels(px.to(dev), dtype)).float(), dim=-1)
        cos = (i * F.normalize(net.text_embeds(ids).float(), dim=-1)).sum(-1)
        prob = torch.sigmoid(cos * net.logit_scale.float().exp() + net.logit_bias.float())
        return [{"score": c, "prob": p} for c, p in zip(cos.tolist(), prob.tolist())]

    return run_shards("score", cfg, {"command": "score", "model": cfg.model},
                      net.vision.config.image_size, ("score", "prob"), score_batch)


# MLM-Filter (formats.md §3.4-3.5), byte for byte: the qwen_instruct conversation around the v2 instruction template.
MLM_TEMPLATE = "Text Caption: {caption}\n\n{criteria} A higher score indicates higher level of {aspect}. Ensure that your scoring is nuanced and uses the entire range from 0 to 100, reflecting the subtle differences. The score should be given as an integer, with each number between 0 and 100 considered as a potential score, avoiding the tendency to round to multiples of 5 or 10. Please first output a single line containing the value indicating the scores. In the subsequent line, please provide a comprehensive explanation of your evaluation, avoiding any potential bias."  # noqa: E501
MLM_CRITERIA = {  # verbatim: tests pin each full prompt by its sha256
    "image_text_matching": "Please evaluate if the provided text caption accurately represents the main features and objects of the image. The caption doesn't need to detail every aspect of the image, but it should capture its primary theme. Rate the overall quality of the text caption's match to the image on a scale of 1-100, considering the criteria mentioned.",  # noqa: E501
    "object_detail_fulfillment": "Please evaluate the text caption to determine if it provides detailed descriptions of objects that align with the image. Specifically, assess if the caption sufficiently describes the color, size, position, shape, material, etc., of the objects. Afterward, rate the caption's overall accuracy in capturing object details from the image on a scale of 1-100, based on the criteria provided.",  # noqa: E501
    "caption_text_quality": 'Please evaluate the text caption based on the following criteria: Grammatical Correctness, Diversity of Vocabulary (e.g., the range and uniqueness of words used), Fluency (e.g., smoothness and natural flow of sentences), Readability, Length, and Structure. Assign an overall quality score on a scale of 1-100.',  # noqa: E501
    "semantic_understanding": 'Evaluate the given text caption in relation to its corresponding image. Your goal is to determine if the text caption provides additional semantic information that isn\'t readily apparent just from the image itself.\n\nFor example:\n\n1. If the image mentions "a man" but the caption elaborates he is a "homeless man" or a "businessman," then the caption is enriching the semantic context.\n2. If the caption introduces concepts like the mathematical tangent function, which require in-depth knowledge to deduce, it is imparting external semantics.\n3. Captions revealing specific location addresses, festival details, or other nuanced data not easy to infer from the image also provide external semantic information.\n4. Directly identifying specific entities in the image such as buildings, people, bird species, animal breeds, car models, engines, etc., in the caption introduces additional insights.\n5. Should the image act as a contextual backdrop and the caption describes elements not explicitly showcased in the image, it has semantic depth.\n6. Lastly, if the caption depicts relationships between the subjects in the image, which need commonsense knowledge to understand, it should be considered semantically rich.\n\nPlease assess and determine the extent of semantic enrichment the caption provides over the image. Rate the text caption\'s semantic depth on a scale from 1 to 100.',  # noqa: E501
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
class MLMConfig(ScoreConfig):
    """MLM-Filter scores: the judge's 2 greedy tokens (raw) and their parsed integer, one line per sample."""
    batch_size: int = 16
    metric: str = "semantic_understanding"  # or image_text_matching | object_detail_fulfillment | caption_text_quality


def mlm(cfg: MLMConfig) -> dict:
    if cfg.metric not in MLM_CRITERIA:
        raise SystemExit(f"mlm: --metric is one of {list(MLM_CRITERIA)}")
    import tokenizers
    dev, dtype = device_dtype(cfg.precision)
    judge = W.load_vlm(M.need(cfg.model, "--model is the judge", "config.json", True), dtype=dtype).to(dev).eval()
    if judge.tokenizer_path is None:
        raise SystemExit(f"mlm: {cfg.model} has no tokenizer")
    tok = tokenizers.Tokenizer.from_file(judge.tokenizer_path)  # control tokens in the prompt parse as tokens
    stop = [i for t in ("<|im_end|>", "<|endoftext|>") if (i := tok.token_to_id(t)) is not None]

    def score_batch(rows, px):
        keep = [k for k, r in enumerate(rows) if "<image>" not in r["caption"]]  # it would ask for a second image
        # greedy, 2 new tokens; pads masked (VLM.generate), unlike the reference's, so scores do not move with batches
        new = judge.generate([mlm_ids(tok, rows[k]["caption"], cfg.metric) for k in keep], M.normalize_pixels(
            px[keep].to(dev), dtype), max_new_tokens=2, stop_ids=stop) if keep else []
        raw = dict(zip(keep, (tok.decode(ids, skip_special_tokens=True) for ids in new)))
        return [{"raw": raw[k], "score": parse_score(raw[k])} if k in raw else
                {"error": "bad caption: contains <image>"} for k in range(len(rows))]

    return run_shards("mlm", cfg, {"command": "mlm", "model": cfg.model, "metric": cfg.metric},
                      judge.config.vision.image_size, ("raw", "score"), score_batch)


# The toy SigLIP's writer: HF layout, loadable by weights.load_siglip and transformers' SiglipModel. Our prefix
# -> transformers' (leaves inside blocks by W.HF_LEAVES, the fused q/k/v split).
SIGLIP_HF = {"vision.blocks.": "vision_model.encoder.layers.", "vision.post_norm.": "vision_model.post_layernorm.",
             "vision.pos_embed": "vision_model.embeddings.position_embedding.weight",
             "vision.patch_embed.": "vision_model.embeddings.patch_embedding.",
             "vision.head.probe": "vision_model.head.probe", "vision.head.norm2.": "vision_model.head.layernorm.",
             "vision.head.qkv.": "vision_model.head.attention.in_proj_", "vision.head.fc": "vision_model.head.mlp.fc",
             "vision.head.proj.": "vision_model.head.attention.out_proj.", "text.blocks.": "text_model.encoder.layers.",
             "text.token_embed.": "text_model.embeddings.token_embedding.", "text.head.": "text_model.head.",
             "text.pos_embed": "text_model.embeddings.position_embedding.weight",
             "text.final_norm.": "text_model.final_layer_norm.", "logit_": "logit_"}


def save_siglip(out_dir: str, model: M.Siglip, tokenizer: str, pad: tuple[str, int], eos: tuple[str, int]):
    """config.json (vision and text configs), model.safetensors (HF names), the tokenizer (tokenizer.json or
    spiece.model) and its tokenizer_config.json (pad and eos are its (token, id); no attention_mask, as the official
    converter ships SigLIP, which attends to its pads). config.json is written last."""
    import shutil

    def tensors():
        for name, t in model.state_dict().items():
            pre = next(p for p in SIGLIP_HF if name.startswith(p))
            hf = SIGLIP_HF[pre] + ".".join(W.HF_LEAVES.get(p, p) for p in name[len(pre):].split(".") if p)
            yield from zip(map(hf.format, "qkv"), t.chunk(3)) if "{}" in hf else [(hf, t)]
    os.makedirs(out_dir, exist_ok=True)
    W.write_safetensors(out_dir, tensors())
    sp, t = tokenizer.endswith(".model"), model.text  # SiglipText keeps no config: read it off the modules
    shutil.copyfile(tokenizer, os.path.join(out_dir, "spiece.model" if sp else "tokenizer.json"))
    M.write_json(os.path.join(out_dir, "tokenizer_config.json"), {
        "tokenizer_class": "SiglipTokenizer" if sp else "PreTrainedTokenizerFast", "pad_token": pad[0],
        "eos_token": eos[0], "model_max_length": t.pos_embed.shape[0], "model_input_names": ["input_ids"]})
    vision = W.hf_configs(W.VLMConfig(model.vision.config, W.QwenConfig()))[0]
    text = dict(model_type="siglip_text_model", vocab_size=t.token_embed.num_embeddings, hidden_size=t.head.in_features,
                intermediate_size=t.blocks[0].fc1.out_features, num_hidden_layers=len(t.blocks),
                num_attention_heads=t.blocks[0].heads, max_position_embeddings=t.pos_embed.shape[0],
                projection_size=t.head.out_features, layer_norm_eps=t.final_norm.eps,
                hidden_act="gelu_pytorch_tanh" if t.blocks[0].approximate == "tanh" else "gelu",
                pad_token_id=pad[1], eos_token_id=eos[1], bos_token_id=None)
    M.write_json(os.path.join(out_dir, "config.json"), {"model_type": "siglip", "architectures": ["SiglipModel"],
                 "vision_config": {**vision, "vision_use_head": model.vision.config.use_head}, "text_config": text})


# -----------------------------------------------------------------------------------------------------------------
# train: the toy world's stand-in for the pretrained SigLIP/DFN/CLIP scorers of real data


@dataclass
class TrainConfig:
    """Train a small SigLIP with the sigmoid loss on image-text shards; save it in HF SigLIP layout."""
    input: list[str] = field(default_factory=list)  # shards; default: the toy world's pool
    out: str = ""  # the SigLIP dir to write (HF layout)
    tokenizer: str = ""  # a tokenizer.json; default: the toy world's
    pad_token: str = "<|endoftext|>"  # pads the text to 64 tokens, as score will
    steps: int = 600  # optimizer steps
    batch_size: int = 256  # image-text pairs per step
    lr: float = 1e-3  # peak learning rate (AdamW)
    width: int = 64  # both towers; patches of image_size / 8
    layers: int = 2  # blocks per tower
    image_size: int = 64  # pixels a side
    seed: int = 0  # initialization and batch order


def train(cfg: TrainConfig) -> dict:
    if not cfg.out:
        raise SystemExit("train: --out is required")
    if not cfg.input or not cfg.tokenizer:
        import toyworld
        world = toyworld.ensure()
        cfg.input, cfg.tokenizer = cfg.input or [f"{world}/pool"], cfg.tokenizer or f"{world}/tokenizer.json"
    tok = SiglipTokenizer(M.need(cfg.tokenizer, "--tokenizer is a tokenizer.json"), 64, cfg.pad_token)
    pixels, ids, skipped = [], [], Counter()
    for src in pack.resolve_inputs(cfg.input):  # the whole set in memory: the toy pool is 20k x 64 px
        for rows, px in shard_batches(src, 512, cfg.image_size, 2):
            pixels.append(px)
            ids += [tok.encode(r["caption"]) for r in rows if r["error"] is None]
            skipped.update(r["error"].split(":")[0] for r in rows if r["error"])
    pixels, ids, (w, L) = torch.cat(pixels), torch.tensor(ids), (cfg.width, cfg.layers)
    print(f"train: {len(ids):,} pairs, skipped {dict(skipped)}", file=sys.stderr)
    torch.manual_seed(cfg.seed)
    net = M.Siglip(M.VisionConfig(cfg.image_size, cfg.image_size // 8, w, 2 * w, L, max(1, w // 32)),
                   M.TextConfig(tok.tok.get_vocab_size(), w, 2 * w, L, max(1, w // 32), 64, w))
    for name, p in net.named_parameters():  # roughly HF's init; then t = log 10 and b = -10, the paper's start
        p.data = torch.zeros_like(p) if name.endswith("bias") else torch.ones_like(p) if p.dim() == 1 else \
            torch.randn_like(p) * 0.02
    net.logit_scale.data.fill_(math.log(10.0)), net.logit_bias.data.fill_(-10.0)
    opt, gen = torch.optim.AdamW(net.parameters(), cfg.lr, weight_decay=0.1), torch.Generator().manual_seed(cfg.seed)
    t0 = time.time()
    for step in range(1, cfg.steps + 1):
        for g in opt.param_groups:  # linear warmup over 5% of the steps, then cosine to 0
            g["lr"] = cfg.lr * min(1, step / max(1, cfg.steps // 20)) * 0.5 * (1 + math.cos(math.pi * step / cfg.steps))
        pick = torch.randint(len(ids), (cfg.batch_size,), generator=gen)
        i = F.normalize(net.image_embeds(M.normalize_pixels(pixels[pick])), dim=-1)
        logits = i @ F.normalize(net.text_embeds(ids[pick]), dim=-1).T * net.logit_scale.exp() + net.logit_bias
        loss = -F.logsigmoid((2 * torch.eye(len(pick)) - 1) * logits).sum() / len(pick)  # +1: the pair, -1: others
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == cfg.steps:
            print(f"train: step {step}/{cfg.steps} loss {loss.item():.3f} {step * len(pick) / (time.time() - t0):,.0f} "
                  f"pairs/s ETA {(time.time() - t0) / step * (cfg.steps - step) / 60:.1f} min", file=sys.stderr)
    save_siglip(cfg.out, net, cfg.tokenizer, (tok.pad, tok.pad_id), (tok.pad, tok.pad_id))
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
    """A DataComp subset file: a .npy of dtype u8,u8."""
    a = np.load(M.need(path, "python filter.py select --out KEEP.npy writes one"), mmap_mode="r", allow_pickle=False)
    if a.dtype != UID:
        raise SystemExit(f"{path}: uid array has dtype {a.dtype}, expected u8,u8")
    return np.asarray(a)


def save_npy(path: str, a: np.ndarray):
    with open(tmp := os.path.join(os.path.dirname(path) or ".", f".{os.path.basename(path)}.tmp"), "wb") as f:
        np.save(f, a)
    os.replace(tmp, path)


@dataclass
class SelectConfig:
    """Keep samples by score threshold (--scores DIR:MIN), top fraction, status and uid lists; union or intersect."""
    scores: list[str] = field(default_factory=list)  # score/mlm output dirs, each DIR or DIR:MIN (keep score >= MIN)
    uids: list[str] = field(default_factory=list)  # DataComp uid files (.npy, u8,u8)
    top_fraction: float = 0.0  # keep the best round(F * scored lines) of each --scores source; 0 = off
    status: str = ""  # "success": keep only lines whose json status is this
    union: bool = False  # keep what any source keeps (the paper: SU >= 85 or DFN)
    intersect: bool = False  # keep what every source keeps
    out: str = ""  # KEEP.npy; the summary goes to KEEP.json


def select(cfg: SelectConfig) -> dict:
    n = len(cfg.scores) + len(cfg.uids)
    if not cfg.out or not n or n > 1 and not (cfg.union or cfg.intersect) or cfg.union and cfg.intersect or \
            not 0 <= cfg.top_fraction <= 1:
        raise SystemExit("select: --out, a --scores or --uids source (several: --union or --intersect); F in [0, 1]")
    sets, summary = [], []
    for spec in cfg.scores:
        d, _, m = spec.rpartition(":") if re.fullmatch(r".+:-?[\d.]+(e-?\d+)?", spec) else (spec, "", "")
        files = sorted(glob.glob(os.path.join(glob.escape(d), "*.jsonl")))
        if not files:
            raise SystemExit(f"select: no score files (*.jsonl) in {d}")
        lines = [json.loads(s) for f in files for s in open(f)]
        scored = [x for x in lines if x["error"] is None and x["score"] is not None]
        keep = [x for x in scored if (not m or x["score"] >= float(m)) and cfg.status in ("", x["status"])]
        if cfg.top_fraction:  # exactly round(F * n) of the n scored lines; ties broken by uid, then key
            best = sorted(scored, key=lambda x: (-x["score"], str(x["uid"]), x["key"]))
            top = {id(x) for x in best[: math.floor(cfg.top_fraction * len(scored) + 0.5)]}
            keep = [x for x in keep if id(x) in top]
        pairs = [p for x in keep if (p := uid_pair(x["uid"])) is not None]
        sets.append(np.unique(np.array(pairs, dtype=UID)))
        summary.append({"source": spec, "lines": len(lines), "scored": len(scored), "kept": len(keep),
                        "kept_without_uid": len(keep) - len(pairs), "unique_uids": len(sets[-1])})
    for path in cfg.uids:
        sets.append(np.unique(a := load_uids(path)))
        summary.append({"source": path, "uids": len(a), "unique_uids": len(sets[-1])})
    union = np.unique(np.concatenate(sets))
    inter = functools.reduce(np.intersect1d, sets)
    out = inter if cfg.intersect else union
    save_npy(cfg.out, out)
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
    input: list[str] = field(default_factory=list)  # shards: files, dirs, globs, {a..b} (pack.py's patterns)
    uids: str = ""  # the uids to keep: a DataComp uid file (.npy, u8,u8), e.g. select's output
    out: str = ""  # dir of the new shards
    shard_size: int = 10000  # samples per output shard
    workers: int = 0  # processes; 0 = all cores


def kept_samples(src: str, uids: np.ndarray, counts: Counter):
    """The samples of src whose json uid is in the sorted `uids`, in order, as read_tar gives them; counts gets seen,
    kept, dropped and errors (no uid, a broken tar)."""
    for key, members in pack.read_tar(src):
        counts["seen"] += key is not None
        if isinstance(members, str):
            counts["error broken_tar"] += key is not None
            return
        try:
            pair = uid_pair(json.loads(members["json"][0]).get("uid"))
        except (KeyError, ValueError, AttributeError):  # no json, not json, not an object
            pair = None
        if pair is None:
            counts["error no_uid"] += 1
        elif (i := int(np.searchsorted(uids, np.array(pair, UID)))) < len(uids) and tuple(uids[i]) == pair:
            counts["kept"] += 1
            yield key, members
        else:
            counts["dropped"] += 1


def count_shard(job) -> dict:  # pass 1: counts only
    counts = Counter()
    sum(1 for _ in kept_samples(job[0], np.load(job[1], mmap_mode="r"), counts))
    return dict(counts)


def write_output(job) -> dict:
    """Output shard j: kept samples [a, b) of each of its input shards, in input order, members byte for byte."""
    j, slices, uids_path, out = job
    uids, taken, renamed = np.load(uids_path, mmap_mode="r"), set(), 0
    with open(tmp := os.path.join(out, f".{j:08d}.tar.tmp"), "wb") as f:
        for src, a, b in slices:
            for key, members in itertools.islice(kept_samples(src, uids, Counter()), a, b):
                new, k = key, 0
                while new in taken:  # a key clash between sources: the first free key_N, the same on every run
                    k += 1
                    new = f"{key}_{k}"
                taken.add(new)
                renamed += new != key
                f.writelines(pack.tar_member(f"{new}.{ext}", data) for ext, (data, _) in members.items())
        f.write(bytes(1024))
    os.replace(tmp, path := os.path.join(out, f"{j:08d}.tar"))
    stats = {"shard": j, "samples": len(taken), "renamed": renamed, "bytes": os.path.getsize(path)}
    M.write_json(os.path.join(out, f"{j:08d}_stats.json"), stats)
    return stats


def _finished(out: str, j: int) -> bool:  # its stats are written after its tar, which must have the recorded size
    try:
        return json.load(open(f"{out}/{j:08d}_stats.json"))["bytes"] == os.path.getsize(f"{out}/{j:08d}.tar")
    except (OSError, ValueError, KeyError):
        return False


def reshard(cfg: ReshardConfig) -> dict:
    """Two passes over the inputs, in parallel: count the kept samples of every input shard (cached in sizes.json,
    as DataComp's shard table), then write each unfinished output shard from the inputs its samples come from."""
    if not (cfg.input and cfg.uids and cfg.out) or cfg.shard_size < 1:
        raise SystemExit("reshard: --input, --uids and --out are required; --shard-size >= 1")
    sources, out, S, t0 = pack.resolve_inputs(cfg.input), cfg.out, cfg.shard_size, time.time()
    os.makedirs(out, exist_ok=True)
    for p in glob.glob(os.path.join(glob.escape(out), ".*.tmp")):
        os.remove(p)  # left by a killed run
    uids = np.unique(load_uids(cfg.uids))  # sorted and unique whatever the file was: searchsorted needs it
    table = {"inputs": sources, "shard_size": S, "uids_sha256": hashlib.sha256(uids.tobytes()).hexdigest()}
    sizes = json.load(open(p)) if os.path.isfile(p := os.path.join(out, "sizes.json")) else None
    if sizes is not None and {k: sizes[k] for k in table} != table:
        raise SystemExit(f"reshard: {out} was made from other inputs, uids or shard size; use a new --out")
    save_npy(sorted_uids := os.path.join(out, "uids.npy"), uids)
    with multiprocessing.Pool(max(1, cfg.workers or len(os.sched_getaffinity(0)))) as pool:
        if sizes is None:
            sizes = {**table, "counts": pool.map(count_shard, [(s, sorted_uids) for s in sources], chunksize=1)}
            M.write_json(p, sizes)
        # kept sample g (counted over all inputs in order) goes to output shard g // S: the same shards on every run
        kept = [c.get("kept", 0) for c in sizes["counts"]]
        ends, n_out = np.cumsum([0] + kept).tolist(), -(-sum(kept) // S)
        jobs = [(j, [(s, max(j * S, e0) - e0, min((j + 1) * S, e1) - e0) for s, e0, e1 in zip(sources, ends, ends[1:])
                     if e0 < (j + 1) * S and e1 > j * S], sorted_uids, out)
                for j in range(n_out) if not _finished(out, j)]
        for done, stats in enumerate(pool.imap_unordered(write_output, jobs), 1):
            progress("reshard", done, len(jobs), done * S, t0)
    shards = [json.load(open(f"{out}/{j:08d}_stats.json")) for j in range(n_out)]
    c = sum((Counter(c) for c in sizes["counts"]), Counter())
    errors = {k.removeprefix("error "): v for k, v in c.items() if k.startswith("error ")}
    total = {"seen": c["seen"], "kept": c["kept"], "dropped": c["dropped"], "errors": errors, "shards": n_out,
             "renamed": sum(s["renamed"] for s in shards), "uids_listed": len(uids), "seconds": time.time() - t0}
    # counts in == counts out: every sample read is kept, dropped or an error; every kept one is in an output shard
    if c["seen"] != c["kept"] + c["dropped"] + sum(errors.values()) or sum(s["samples"] for s in shards) != c["kept"]:
        raise RuntimeError(f"reshard: counts do not add up: {total}")
    M.write_json(os.path.join(out, "stats.json"), total)
    print(f"reshard: {total}", file=sys.stderr)
    return total


COMMANDS = {"train": (TrainConfig, train), "score": (ScoreConfig, score), "mlm": (MLMConfig, mlm),
            "select": (SelectConfig, select), "reshard": (ReshardConfig, reshard)}


def main(argv: list[str] | None = None):
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in COMMANDS:
        raise SystemExit(f"usage: filter.py {{{','.join(COMMANDS)}}} --help")
    return COMMANDS[argv[0]][1](M.parse_config(COMMANDS[argv[0]][0], argv[1:], prog=f"filter.py {argv[0]}"))


if __name__ == "__main__":
    main()
