"""
filter.py score throughput: `filter.py score` (DataLoader workers decode, our SigLIP towers) against the same scoring
done with transformers' SiglipModel + SiglipProcessor (PIL decode and preprocessing in the loop, same batches), on
the same shards in one CPU run; then the projected GPU-hours to score DataComp-medium's 128M pairs with SigLIP-so400m
(and with the MLM-Filter judge) on H200s, from FLOPs per pair and stated assumptions.

    python bench/filter.py                      # toy world pool shard(s), a random SigLIP of --width
    python bench/filter.py --shards 2 --width 256 --image-size 224
    python bench/filter.py --toy                # the toy filter: train, score, select 0.9; P/R of the dropped set

gpu_section_filter(smoke) is the GPU check's filter section (bench/gpu.py calls it): so400m scoring end to end.
"""
import dataclasses
import glob
import io
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import filter as FL  # noqa: E402
import model as M  # noqa: E402
import pack  # noqa: E402
import weights as W  # noqa: E402

DATACOMP_MEDIUM = 128_000_000


@dataclass
class Config:
    shards: int = 1  # toy world pool shards (2500 pairs each)
    width: int = 128  # the random SigLIP scored with (both towers)
    layers: int = 4
    image_size: int = 64
    patch_size: int = 8
    batch_size: int = 64
    workers: int = 1  # decode processes beside the model's threads (a 2-core machine has no room for more)
    repeats: int = 2
    toy: bool = False  # instead: the toy filter (train, score, select --top-fraction 0.9) against the manifest
    h200_tflops: float = 989.0  # dense bf16 peak
    mfu: float = 0.4  # assumed for the projection


def random_siglip(out_dir, tokenizer, v: M.VisionConfig, t: M.TextConfig, seed=0):
    torch.manual_seed(seed)
    net = M.Siglip(v, t)
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.02)
    FL.save_siglip(out_dir, net, tokenizer, ("<|endoftext|>", 0), ("<|endoftext|>", 0))
    return net


def siglip_flops_per_pair(v: M.VisionConfig, t: M.TextConfig, text_len: int = 64) -> float:
    """Forward FLOPs: 2 x weights x tokens for every linear layer, plus attention's two matmuls, per tower."""
    def tower(d, ff, layers, n):
        return layers * (2 * n * (4 * d * d + 2 * d * ff) + 4 * n * n * d)
    n = (v.image_size // v.patch_size) ** 2
    vision = tower(v.hidden_size, v.intermediate_size, v.num_layers, n) + 2 * n * 3 * v.patch_size ** 2 * v.hidden_size
    head = 2 * n * 2 * v.hidden_size ** 2 + 2 * 2 * v.hidden_size * v.intermediate_size  # probe k/v over n, then MLP
    return vision + head + tower(t.hidden_size, t.intermediate_size, t.num_layers, text_len)


def projection(cfg) -> dict:
    so400m = siglip_flops_per_pair(M.VisionConfig(), M.TextConfig())
    q = M.QwenConfig()  # MLM-Filter: so400m vision (27 blocks), 144 image tokens + ~420 prompt tokens, 2 new tokens
    per_layer = q.hidden_size * ((2 * q.num_heads + 2 * q.num_kv_heads) * q.head_dim + 3 * q.intermediate_size)
    llm = 2 * 564 * q.num_layers * per_layer
    judge = siglip_flops_per_pair(M.VisionConfig(), M.TextConfig()) - siglip_flops_per_pair(
        M.VisionConfig(), M.TextConfig(), 0) + llm
    rate = cfg.h200_tflops * 1e12 * cfg.mfu
    return {"so400m_gflop_per_pair": so400m / 1e9, "so400m_h200_hours": DATACOMP_MEDIUM * so400m / rate / 3600,
            "mlm_judge_gflop_per_pair": judge / 1e9, "mlm_judge_h200_hours": DATACOMP_MEDIUM * judge / rate / 3600}


def hf_score(model_dir, shard, batch_size):
    """The same scoring with transformers: decode each image with PIL, SiglipProcessor, SiglipModel, per batch."""
    import transformers
    from PIL import Image
    ref = transformers.SiglipModel.from_pretrained(model_dir).eval()
    size = ref.config.vision_config.image_size
    proc = transformers.SiglipProcessor(transformers.SiglipImageProcessor(size={"height": size, "width": size}),
                                        transformers.PreTrainedTokenizerFast(
                                            tokenizer_file=os.path.join(model_dir, "tokenizer.json"),
                                            pad_token="<|endoftext|>", model_input_names=["input_ids"]))
    samples = [s for s in FL.read_samples(shard) if s["error"] is None]
    scores = []
    for b in range(0, len(samples), batch_size):
        chunk, images = samples[b: b + batch_size], []
        for s in chunk:
            try:
                images.append(Image.open(io.BytesIO(s["image"])).convert("RGB"))
            except Exception:
                images.append(None)
        ok = [(s, im) for s, im in zip(chunk, images) if im is not None]
        x = proc(text=[s["caption"] for s, _ in ok], images=[im for _, im in ok], padding="max_length",
                 max_length=64, truncation=True, return_tensors="pt")
        with torch.no_grad():
            out = ref(**x)
        scores += out.logits_per_image.diagonal().tolist()
    return len(samples)


def toy_filter(out: str = "runs/toy-filter") -> dict:
    """filter.py train, score, select --top-fraction 0.9 on the toy world; the dropped scored samples against the
    manifest's wrong captions (10% of the pool)."""
    import toyworld
    world, t0 = toyworld.ensure(), time.time()
    FL.main(["train", "--out", f"{out}/siglip"])
    t_train = time.time() - t0
    FL.main(["score", "--input", f"{world}/pool", "--model", f"{out}/siglip", "--out", f"{out}/scores",
             "--batch-size", "256"])
    FL.main(["select", "--scores", f"{out}/scores", "--top-fraction", "0.9", "--out", f"{out}/keep.npy"])
    keep = set(map(tuple, np.load(f"{out}/keep.npy").tolist()))
    wrong = set(json.load(open(f"{world}/manifest.json"))["pool"]["wrong_caption"])
    lines = [json.loads(s) for f in sorted(glob.glob(f"{out}/scores/*.jsonl")) for s in open(f)]
    dropped = {x["key"] for x in lines if x["error"] is None and FL.uid_pair(x["uid"]) not in keep}
    r = {"dropped": len(dropped), "wrong": len(wrong), "precision": len(dropped & wrong) / len(dropped),
         "recall": len(dropped & wrong) / len(wrong), "train_s": t_train, "total_s": time.time() - t0}
    print(f"toy filter: precision {r['precision']:.4f}, recall {r['recall']:.4f} ({r['dropped']} dropped, "
          f"{r['wrong']} wrong captions); train {t_train / 60:.1f} min, all {r['total_s'] / 60:.1f} min")
    return r


def main():
    cfg = M.parse_config(Config)
    if cfg.toy:
        return toy_filter()
    import toyworld
    world = toyworld.ensure()
    shards = sorted(os.path.join(world, "pool", f) for f in os.listdir(os.path.join(world, "pool")))[: cfg.shards]
    tmp = tempfile.mkdtemp()
    try:
        tok = os.path.join(world, "tokenizer.json")
        w, L, vocab = cfg.width, cfg.layers, FL.SiglipTokenizer(tok, 64, "<|endoftext|>").tok.get_vocab_size()
        random_siglip(os.path.join(tmp, "m"), tok, M.VisionConfig(cfg.image_size, cfg.patch_size, w, 4 * w, L, w // 32),
                      M.TextConfig(vocab, w, 4 * w, L, w // 32, 64, w))
        n, best = sum(sum(1 for _ in pack.read_tar(s)) for s in shards), {"ours": 1e9, "theirs": 1e9}
        for r in range(cfg.repeats):  # interleaved, best of each: the machine may be shared
            t0 = time.time()
            FL.main(["score", "--input", *shards, "--model", os.path.join(tmp, "m"), "--out",
                     os.path.join(tmp, f"s{r}"), "--batch-size", str(cfg.batch_size), "--workers", str(cfg.workers)])
            best["ours"] = min(best["ours"], time.time() - t0)
            t0 = time.time()
            m = sum(hf_score(os.path.join(tmp, "m"), s, cfg.batch_size) for s in shards)
            best["theirs"] = min(best["theirs"], time.time() - t0)
        ours, theirs = n / best["ours"], m / best["theirs"]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"score, {n} pairs, SigLIP width {cfg.width} x {cfg.layers} layers at {cfg.image_size} px, batch "
          f"{cfg.batch_size}, {cfg.workers} decode workers, {torch.get_num_threads()} torch threads, best of "
          f"{cfg.repeats} interleaved runs each:")
    print(f"  filter.py score            {ours:8.1f} samples/s (every line written, errors included)")
    print(f"  transformers SiglipModel   {theirs:8.1f} samples/s ({m} scorable pairs, no output written)")
    print(f"  ratio                      {ours / theirs:8.2f}x")
    p = projection(cfg)
    print(f"DataComp-medium, {DATACOMP_MEDIUM / 1e6:.0f}M pairs, on H200 ({cfg.h200_tflops:.0f} TFLOP/s bf16 dense, "
          f"{cfg.mfu:.0%} MFU assumed, decoding keeping up: "
          f"~{cfg.h200_tflops * 1e3 * cfg.mfu / p['so400m_gflop_per_pair']:,.0f} pairs/s/GPU, ~2 decode cores each):")
    print(f"  SigLIP-so400m/14@384 score: {p['so400m_gflop_per_pair']:.0f} GFLOP/pair -> {p['so400m_h200_hours']:.0f} "
          f"GPU-hours")
    print(f"  MLM-Filter judge (so400m + Qwen2.5-1.5B over ~564 tokens, prefill only): "
          f"{p['mlm_judge_gflop_per_pair']:.0f} GFLOP/pair -> {p['mlm_judge_h200_hours']:.0f} GPU-hours")
    return {"ours": ours, "transformers": theirs, **p}


def gpu_section_filter(smoke: bool, vision: M.VisionConfig | None = None, text_layers: int = 27) -> dict:
    """GPU check: a random SigLIP-so400m/14@384 (HF layout, bf16) scores toy-world pool shards end to end through
    `filter.py score` (decode workers, batching, jsonl), and its towers alone on random pixels; both as pairs/s and
    as projected H200-hours for DataComp-medium's 128M pairs. (vision/text_layers shrink it for a CPU dry run.)"""
    import toyworld
    cuda = torch.cuda.is_available()
    world = toyworld.ensure()  # the default world: 8 shards of 2500 pairs at 64 px (upscaled to the tower's size)
    pool = os.path.join(world, "pool")
    shards = sorted(os.path.join(pool, f) for f in os.listdir(pool))[: 1 if smoke else 2]
    tok = os.path.join(world, "tokenizer.json")
    if smoke and vision is None:  # a CPU test of the section: the tiny tower, two text blocks
        vision, text_layers = dataclasses.replace(M.preset("tiny").vision, use_head=True), 2
    v = vision or M.VisionConfig()  # so400m/14@384, and a text tower of its shape
    vocab = FL.SiglipTokenizer(tok, 64, "<|endoftext|>").tok.get_vocab_size()
    t = M.TextConfig(vocab, v.hidden_size, v.intermediate_size, text_layers, v.num_heads, 64, v.hidden_size)
    tmp, dev, dtype = tempfile.mkdtemp(), torch.device("cuda" if cuda else "cpu"), torch.bfloat16 if cuda else None
    try:
        random_siglip(os.path.join(tmp, "m"), tok, v, t)
        net, B, steps = W.load_siglip(os.path.join(tmp, "m"), dtype=dtype).to(dev).eval(), 32 if smoke else 256, 3 if smoke else 6
        px = torch.randn(B, 3, v.image_size, v.image_size, device=dev, dtype=dtype)
        ids = torch.zeros(B, 64, dtype=torch.long, device=dev)
        with torch.no_grad():
            for k in range(steps):
                if k == 1:  # the first is warm-up
                    torch.cuda.synchronize() if cuda else None
                    t0 = time.time()
                net.image_embeds(px), net.text_embeds(ids)
            torch.cuda.synchronize() if cuda else None
        towers = B * (steps - 1) / (time.time() - t0)
        del net
        n, t0 = sum(sum(1 for _ in pack.read_tar(s)) for s in shards), time.time()
        FL.main(["score", "--input", *shards, "--model", os.path.join(tmp, "m"), "--out", os.path.join(tmp, "s"),
                 "--batch-size", str(B), "--workers", str(min(12, os.cpu_count() or 1))])
        end_to_end = n / (time.time() - t0)
        lines = sum(1 for f in glob.glob(os.path.join(tmp, "s", "*.jsonl")) for _ in open(f))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    flops = siglip_flops_per_pair(v, t)
    return {"pairs": n, "lines": lines, "end_to_end_pairs_per_s": end_to_end, "towers_pairs_per_s": towers,
            "towers_tflops": towers * flops / 1e12, "h200_hours_end_to_end": DATACOMP_MEDIUM / end_to_end / 3600,
            "h200_hours_towers": DATACOMP_MEDIUM / towers / 3600,
            "device": torch.cuda.get_device_name() if cuda else "cpu"}


if __name__ == "__main__":
    out = main()
    print(json.dumps({k: round(v, 3) for k, v in out.items()}))
