"""
Supervised tokens per second of packed SFT against --no-pack (one conversation per row, length-grouped, padded to
the batch's longest row, the official layout), on the same conversations, in one CPU run. Both sides go through
sft.py's own preparation and train.make_batch, and time forward + backward of every micro-batch of the set.

  - toy: the toy world's sft/sft.json (the tiny preset: 64 tokens per image, 512-token rows);
  - llava: synthetic conversations with LLaVA-665k-like lengths on a model whose tower has a 27x27 patch grid, so an
    image is 729 tokens, in 4096-token rows: 1-10 rounds (VQA-style one-word answers, and replies of tens to hundreds
    of tokens), 6% text-only (ShareGPT-like, long). It also measures the mean conversations per packed row, which
    sets the paper preset's --global-batch (about the official 128 conversations a step).

    python bench/sft.py [--n-toy 256] [--n-llava 256] [--micro-batch 2]

`gpu_section_sft(smoke)` is the GPU check's sft section (bench/gpu.py): the paper's shapes (seq 4096, 729 tokens).
"""
import json
import os
import random
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import sft  # noqa: E402
import toyworld  # noqa: E402
import train  # noqa: E402


@dataclass
class Config:
    n_toy: int = 256  # conversations from the toy world
    n_llava: int = 256  # synthetic LLaVA-665k-like conversations
    micro_batch: int = 2  # packed rows per forward; --no-pack takes as many conversations as these rows hold
    threads: int = 0  # 0 = torch's default
    seed: int = 0


def llava_like(n: int, seed: int) -> list[tuple[bool, list[tuple[int, int]]]]:
    """(has an image, [(question tokens, reply tokens)] per round) with LLaVA-665k-like lengths."""
    rng, out = random.Random(seed), []
    for _ in range(n):
        if rng.random() < 0.06:  # ShareGPT text-only: few long rounds
            out.append((False, [(rng.randint(20, 200), rng.randint(100, 600)) for _ in range(rng.randint(1, 3))]))
            continue
        kind = rng.random()
        if kind < 0.45:  # VQAv2 / GQA / OCR-VQA style: many rounds of one-word answers
            rounds = [(rng.randint(8, 30), rng.randint(1, 4)) for _ in range(rng.randint(3, 10))]
        elif kind < 0.75:  # LLaVA conversations: a few rounds of tens of tokens
            rounds = [(rng.randint(8, 40), rng.randint(20, 150)) for _ in range(rng.randint(1, 5))]
        else:  # detailed descriptions and reasoning: one long reply
            rounds = [(rng.randint(8, 30), rng.randint(100, 400))]
        out.append((True, rounds))
    return out


def write_llava_set(d: str, tok: M.Tokenizer, n: int, seed: int) -> str:
    """The synthetic set as a LLaVA JSON with images, text made of single-token words of the toy vocabulary."""
    words = [w for w in tok.tok.get_vocab() if w.startswith("Ġ") and w[1:].isalpha()]
    words = [w for w in (" " + w[1:] for w in words) if len(tok.encode(w)) == 1][:500]
    rng = random.Random(seed)
    os.makedirs(os.path.join(d, "images"), exist_ok=True)
    img = toyworld.encode(toyworld.render(toyworld.sample_scene(rng, "train"), 54))
    with open(os.path.join(d, "images", "0.jpg"), "wb") as f:
        f.write(img)
    recs = []
    for i, (image, rounds) in enumerate(llava_like(n, seed)):
        conv = []
        for k, (q, a) in enumerate(rounds):
            text = "".join(rng.choices(words, k=q)).strip()
            conv += [{"from": "human", "value": ("<image>\n" if image and k == 0 else "") + text},
                     {"from": "gpt", "value": "".join(rng.choices(words, k=a)).strip()}]
        recs.append({"id": str(i), **({"image": "images/0.jpg"} if image else {}), "conversations": conv})
    with open(path := os.path.join(d, "llava.json"), "w") as f:
        json.dump(recs, f)
    return path


def run_set(name: str, net: M.VLM, cfg: Config, tok_path: str, data: str, seq_len: int, image_tokens: int):
    """Prepare `data` both ways, then time forward + backward over all of it, the two sides' micro-batches
    interleaved (so that machine noise hits both alike); print and return the figures."""
    res, batches, tmp = {}, {}, tempfile.mkdtemp(prefix=f"bench-sft-{name}-")
    pad_id, image_size = M.Tokenizer(tok_path).pad_id, net.config.vision.image_size
    for mode in ("pack", "no-pack"):
        sc = M.parse_config(sft.Config, ["--data", data, "--init", tmp, "--out", os.path.join(tmp, mode), "--seq-len",
                                         str(seq_len), "--image-tokens", str(image_tokens), f"--{mode}"], sft.PRESETS)
        stats = sft.prepare_rows(sc, tok_path)
        rows = list(sft.pack.read_packed(sc.prepared))
        mb = cfg.micro_batch if mode == "pack" else max(1, round(cfg.micro_batch * res["pack"]["per_row"]))
        batches[mode] = [train.make_batch(rows[i: i + mb], sc, image_size, pad_id) for i in range(0, len(rows), mb)]
        res[mode] = dict(per_row=stats["docs_out"] / stats["rows"], rows=stats["rows"], batch=mb, seconds=0.0)
    step(net, batches["pack"][0])  # warm-up
    for k in range(max(map(len, batches.values()))):
        for mode, bs in batches.items():
            if k < len(bs):
                t = time.perf_counter()
                step(net, bs[k])
                res[mode]["seconds"] += time.perf_counter() - t
    for mode, bs in batches.items():
        v = res[mode]
        v.update(supervised=sum(b["n_sup"] for b in bs), fill=sum(b["n_tokens"] for b in bs) / sum(
            b["input_ids"].numel() for b in bs))
        v["sup_per_s"] = v["supervised"] / v["seconds"]
    r = res["pack"]["sup_per_s"] / res["no-pack"]["sup_per_s"]
    print(f"{name}: {stats['conversations_in']} conversations, seq {seq_len}, {image_tokens} tokens per image")
    for mode, v in res.items():
        print(f"  {mode:>8}: {v['rows']:4d} rows, {v['per_row']:.2f} conversations/row, micro-batch {v['batch']}, "
              f"fill {v['fill']:.1%}, {v['supervised']:,} supervised tokens in {v['seconds']:.1f}s = "
              f"{v['sup_per_s']:,.0f}/s")
    print(f"  packed / --no-pack supervised tokens/s: {r:.2f}x")
    return {**res, "ratio": r}


def step(net, b):
    loss = net(b["input_ids"], M.normalize_pixels(b["pixels"]) if b["n_images"] else None, b["doc_lens"],
               b["targets"]) / b["n_sup"]
    loss.backward()
    net.zero_grad(set_to_none=True)


def tiny_llm(vocab: int) -> M.QwenConfig:
    return M.preset("tiny", vocab_size=-(-vocab // 64) * 64).llm


def main():
    cfg = M.parse_config(Config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    world = toyworld.ensure()
    tok_path = os.path.join(world, "tokenizer.json")
    tok = M.Tokenizer(tok_path)
    torch.manual_seed(cfg.seed)
    tmp = tempfile.mkdtemp(prefix="bench-sft-")
    with open(os.path.join(world, "sft", "sft.json")) as f:
        toy = json.load(f)[: cfg.n_toy]
    with open(toy_path := os.path.join(world, "sft", f".bench-{cfg.n_toy}.json"), "w") as f:
        json.dump(toy, f)  # beside the toy images
    net = M.VLM(M.VLMConfig(M.preset("tiny").vision, tiny_llm(len(tok)), 64)).init_weights(0).train()  # 8x8 grid
    net.vision.requires_grad_(False)
    run_set("toy", net, cfg, tok_path, toy_path, 512, 64)
    os.remove(toy_path)
    vc = M.VisionConfig(54, 2, 96, 256, 3, 4, act="gelu", use_head=False)  # 27x27 patches: 729 tokens an image
    net = M.VLM(M.VLMConfig(vc, tiny_llm(len(tok)), 729)).init_weights(0).train()
    net.vision.requires_grad_(False)
    res = run_set("llava", net, cfg, tok_path, write_llava_set(tmp, tok, cfg.n_llava, cfg.seed), 4096, 729)
    per_row = res["pack"]["per_row"]
    print(f"paper preset: {per_row:.2f} conversations per 4096-token row -> 128 conversations ~ "
          f"{128 / per_row:.0f} rows a step (the preset uses {sft.PRESETS['paper']['global_batch']}: "
          f"{sft.PRESETS['paper']['global_batch'] * per_row:.0f} conversations)")


# -----------------------------------------------------------------------------------------------------------------
# GPU section (bench/gpu.py calls it): the paper's model and shapes, random weights (nothing can be downloaded there)


def gpu_section_sft(smoke: bool, device: str = "") -> dict:
    """Packed vs --no-pack SFT on one device at seq 4096 and 729 tokens per image (the paper preset, random init,
    activation checkpointing, 256 LLaVA-665k-like conversations): supervised tokens/s, MFU, peak memory, fill, and
    their ratio. About a minute on one H200 (cap it at 2). smoke=True: the same 27x27 grid and 4096-token rows on a
    model a few units wide, 8 conversations: that it runs (on a CPU too), not its speed. device "" = cuda if present."""
    dev, dtype = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")), torch.bfloat16
    sync = torch.cuda.synchronize if dev.type == "cuda" else lambda: None
    c = M.preset("paper")
    c.image_tokens = 729
    if smoke:
        c.vision = M.VisionConfig(384, 14, 32, 64, 2, 2, act="gelu", use_head=False)
        c.llm = M.QwenConfig(151936, 64, 128, 2, 2, 1, 32, 1e4)
    torch.manual_seed(0)
    with torch.device(dev):
        net = M.VLM(c)
    net.init_weights(0)
    net.to(dtype).train()
    net.vision.requires_grad_(False)
    net.llm.checkpointing = True
    rng, vocab = np.random.default_rng(0), 151000
    convs = []
    for image, rounds in llava_like(8 if smoke else 256, 0):  # token-level conversations in the qwen2 layout
        ids, labels = [1] + ([M.IMAGE_ID] if image else []), [M.IGNORE] * (1 + image)
        for q, a in rounds:
            ids += rng.integers(3, vocab, q + 5).tolist()
            labels += [M.IGNORE] * (q + 5)
            reply = rng.integers(3, vocab, a + 2).tolist()
            ids, labels = ids + reply, labels + reply
        n = sft.fit(ids, labels, 729, 4096)
        convs.append((ids[:n], labels[:n], ids[:n].count(M.IMAGE_ID)))
    img = toyworld.encode(toyworld.render(toyworld.sample_scene(random.Random(0), "train"), 384))
    lengths = [len(i) + 728 * k for i, _, k in convs]
    packed = [[convs[j] for j in row] for row in sft.pack.pack_fill(lengths, 4096)]
    order = sorted(range(len(convs)), key=lambda j: -lengths[j])  # --no-pack: length-grouped
    plain = [[convs[j]] for j in order]
    out = {"conversations": len(convs), "rows_packed": len(packed), "per_row": len(convs) / len(packed)}
    spec, measured = train.peak_flops(train.Config(), dev, dtype)
    for mode, rows, mb in (("pack", packed, 1), ("no-pack", plain, max(1, round(len(convs) / len(packed))))):
        cfg = sft.Config(seq_len=4096, image_tokens=729, pack=mode == "pack", init="")
        batches = [train.make_batch([{"input_ids": np.array([t for i, _, _ in r for t in i]), "labels": np.array(
            [t for _, lab, _ in r for t in lab]), "doc_lengths": [len(i) for i, _, _ in r],
            "images": [img] * sum(k for _, _, k in r), "shard": "", "row": 0} for r in rows[s: s + mb]], cfg, 384, 0)
            for s in range(0, len(rows), mb)]
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        for k, b in enumerate(batches[:1] + batches):  # the first is a warm-up
            if k == 1:
                sync()
                t = time.perf_counter()
            loss = net(b["input_ids"].to(dev), M.normalize_pixels(b["pixels"].to(dev), dtype) if b["n_images"]
                       else None, b["doc_lens"], b["targets"].to(dev)) / b["n_sup"]
            loss.backward()
            net.zero_grad(set_to_none=True)
        sync()
        dt = time.perf_counter() - t
        sup = sum(b["n_sup"] for b in batches)
        f = sum(train.flops(c, b, False) for b in batches)
        out[mode] = {"sup_tok_per_s": sup / dt, "mfu": f / dt / spec, "mfu_measured": f / dt / measured,
                     "fill": sum(b["n_tokens"] for b in batches) / sum(b["input_ids"].numel() for b in batches),
                     "peak_mem_gib": torch.cuda.max_memory_allocated() / 2**30 if dev.type == "cuda" else 0.0,
                     "micro_batch": mb}
    out["ratio"] = out["pack"]["sup_tok_per_s"] / out["no-pack"]["sup_tok_per_s"]
    return out


if __name__ == "__main__":
    main()
