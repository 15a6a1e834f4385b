"""
Benchmark for pack.py: (1) fill at 4096 of the paper's FFD and of our exact-fill packer on caption-like lengths,
(2) packing throughput on one core on real shards, (3) the same for a naive packer that decodes and re-encodes every
image as the official JSON packer does, run in the same process, and the ratio.

    python bench/pack.py                          # ~1 min on one core
    python bench/pack.py --samples 4000 --image-size 512

Length model for (1), stated exactly: words per caption ~ max(1, round(LogNormal(ln 12 - 0.7^2/2, 0.7))), i.e. mean
12 words, ~0.2% past 70 words; tokens = words + Binomial(words, 0.3) (~1.3 tokens per word, every integer possible);
document length = tokens + 3 (<s>, "\\n", <|im_end|>) + 144 (the image). Shards are packed independently, as the
paper does; fill = tokens / (rows x 4096), so the last, partial row of each shard counts. "bound" is the fill of
the fewest rows possible, ceil(tokens / 4096).
"""
import base64
import io
import json
import os
import random
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import pack  # noqa: E402
from model import Tokenizer, caption_tokens, parse_config  # noqa: E402


@dataclass
class BenchConfig:
    """pack.py benchmark: fill, and throughput against a decode-and-re-encode packer."""
    shards: int = 20  # shards per size for the fill figure
    samples: int = 2000  # samples for the throughput figures (in 2 shards)
    image_size: int = 384  # the longest side of the throughput images is around this
    seed: int = 0


def caption_lengths(rng, n, image_tokens=144):
    words = np.maximum(1, np.round(rng.lognormal(np.log(12) - 0.7**2 / 2, 0.7, n))).astype(int)
    return words, (words + rng.binomial(words, 0.3) + 3 + image_tokens).tolist()


def bench_fill(cfg):
    print(f"(1) fill at 4096, 144 tokens per image, mean [min] over {cfg.shards} shards per size")
    rng = np.random.default_rng(cfg.seed)
    for n in (2500, 5000, 10000):
        fill = {"ffd": [], "fill": [], "fill without each shard's emptiest row": [], "bound": []}
        for _ in range(cfg.shards):
            words, lengths = caption_lengths(rng, n)
            for method in ("ffd", "fill"):
                rows = [sum(lengths[i] for i in row) for row in pack.PACKERS[method](lengths, 4096)]
                fill[method].append(sum(rows) / (len(rows) * 4096))
            fill["fill without each shard's emptiest row"].append(sum(sorted(rows)[1:]) / ((len(rows) - 1) * 4096))
            fill["bound"].append(sum(lengths) / (-(-sum(lengths) // 4096) * 4096))
        print(f"  {n:>6,} samples/shard ({np.mean(lengths):.1f} tokens/doc, {np.mean(words > 70):.2%} past 70 words): "
              + ", ".join(f"{k} {np.mean(v):.2%} [{np.min(v):.2%}]" for k, v in fill.items())
              + f"; fill = bound in {sum(a == b for a, b in zip(fill['fill'], fill['bound']))}/{cfg.shards} shards")


def make_world(root, cfg):
    """Two shards of ~image_size px JPEGs (smooth colour fields, shapes and noise: 20-60 KB, like web photos at this
    size) with captions, and a small BPE tokenizer trained on such captions."""
    import tokenizers as tk

    rng = random.Random(cfg.seed)
    vocab = ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(5000)]
    words, _ = caption_lengths(np.random.default_rng(cfg.seed), cfg.samples)
    captions = [" ".join(rng.choice(vocab) for _ in range(w)) for w in words]
    tok = tk.Tokenizer(tk.models.BPE())
    tok.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = tk.decoders.ByteLevel()
    tok.train_from_iterator(captions, tk.trainers.BpeTrainer(vocab_size=8000, show_progress=False,
                                                             initial_alphabet=tk.pre_tokenizers.ByteLevel.alphabet()))
    tok.add_special_tokens(["<|endoftext|>", "<|im_start|>", "<|im_end|>"])
    tok.save(os.path.join(root, "tokenizer.json"))
    images = []
    for i in range(min(cfg.samples, 200)):  # 200 distinct images, reused: decode cost does not depend on reuse
        w, h = (rng.randint(cfg.image_size * 5 // 6, cfg.image_size * 4 // 3) for _ in range(2))
        y, x = np.mgrid[0:h, 0:w] / max(w, h)
        c = np.array([rng.random() for _ in range(9)]).reshape(3, 3)
        a = np.stack([c[k, 0] + c[k, 1] * np.sin(6 * x + k) + c[k, 2] * np.cos(5 * y - k) for k in range(3)], -1)
        a = np.clip(a * 120 + 60 + np.random.default_rng(i).normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
        img = Image.fromarray(a)
        for _ in range(6):
            x0, y0 = rng.randrange(w), rng.randrange(h)
            img.paste(tuple(rng.randrange(256) for _ in range(3)), (x0, y0, x0 + w // 5, y0 + h // 5))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=90)
        images.append(buf.getvalue())
    os.makedirs(os.path.join(root, "in"))
    for s in range(2):
        members = []
        for i in range(s * cfg.samples // 2, (s + 1) * cfg.samples // 2):
            key = f"{s:05d}{i:05d}"
            members += [(key + ".jpg", images[i % len(images)]), (key + ".txt", captions[i].encode()),
                        (key + ".json", json.dumps({"key": key, "uid": f"{i:032x}"}).encode())]
        with tarfile.open(os.path.join(root, "in", f"{s:05d}.tar"), "w") as tar:
            for name, data in members:
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return np.mean([len(b) for b in images]) / 1e3


def naive_pack(src_dir, out_dir, tok):
    """The official JSON packer's work per sample: decode to RGB (webdataset "pilrgb"), drop 1-px images, re-encode
    as JPEG into base64 json, tokenize; then FFD per shard and one json file per row."""
    import webdataset as wds

    n = 0
    for s, shard in enumerate(sorted(os.listdir(src_dir))):
        docs = []
        ds = wds.DataPipeline(wds.SimpleShardList(os.path.join(src_dir, shard)), wds.tarfile_to_samples(),
                              wds.decode("pilrgb"), wds.to_tuple("jpg;png;jpeg;webp", "txt", "json"))
        for image, text, meta in ds:
            n += 1
            if min(image.size) == 1:
                continue
            buf = io.BytesIO()
            image.save(buf, format="JPEG")
            ids = caption_tokens(tok, text)
            docs.append({"image_info": [{"image_base64": base64.b64encode(buf.getvalue()).decode()}, None],
                         "texts": [None, text], "key": meta["key"], "uid": meta["uid"], "length": len(ids) + 143})
        for r, row in enumerate(pack.pack_ffd([d["length"] for d in docs], 4096)):
            with open(os.path.join(out_dir, f"{s}_{r}_packed.json"), "w") as f:
                json.dump({"data": [docs[i] for i in row], "lengths": [docs[i]["length"] for i in row]}, f, indent=2)
    return n


def bench_throughput(cfg):
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one core
    with tempfile.TemporaryDirectory() as root:
        kb = make_world(root, cfg)
        tokenizer = os.path.join(root, "tokenizer.json")
        flags = ["--input", os.path.join(root, "in"), "--tokenizer", tokenizer, "--workers", "1"]
        ours, naive = [], []
        for k in range(3):  # interleaved, best of 3 each: the figures are the packers', not the machine's hiccups
            t0 = time.perf_counter()
            stats = pack.main(flags + ["--output", os.path.join(root, f"out{k}")])
            ours.append(stats["samples_in"] / (time.perf_counter() - t0))
            os.makedirs(os.path.join(root, f"naive{k}"))
            t0 = time.perf_counter()
            n = naive_pack(os.path.join(root, "in"), os.path.join(root, f"naive{k}"), Tokenizer(tokenizer))
            naive.append(n / (time.perf_counter() - t0))
    print(f"(2) pack.py, one core: {max(ours):,.0f} samples/s ({stats['samples_in']:,} samples in 2 shards, "
          f"~{cfg.image_size} px JPEGs of {kb:.0f} KB on average, written to a temp dir; fill {stats['fill']:.2%})")
    print(f"(3) decode + re-encode packer, same process and shards: {max(naive):,.0f} samples/s; pack.py is "
          f"{max(ours) / max(naive):.1f}x faster")


if __name__ == "__main__":
    cfg = parse_config(BenchConfig)
    bench_fill(cfg)
    bench_throughput(cfg)
