"""
Evaluation throughput: eval.py's batched, length-bucketed KV-cache generation against one row at a time, through
the same run_bench path (prompts, dataloader, generation, scoring, samples.jsonl), on the toy world's MMBench with
the tiny model; the outputs must be identical. Then the projected time of the eight paper benchmarks (~44k
questions) at the paper's shapes on one GPU, from a FLOP and memory-traffic model whose assumptions are printed.
CPU, one process.

    python bench/eval.py [--rows 96] [--batch-size 16] [--style paper] [--gpu H100]

`gpu_section_eval(smoke)` is the same measurement on a GPU at the paper's shapes (random weights), for bench/gpu.py.
"""
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import eval as E  # noqa: E402
import model as M  # noqa: E402
import train  # noqa: E402

# The paper harness's question counts (reference.md §5): MMMU val, MMBench dev with its circular copies, SEED-Bench
# image, MMStar, AI2D test, TextVQA val twice (OCR and Pure variants), MathVista testmini, POPE's three splits.
PAPER_QUESTIONS = {"mmmu": 900, "mmbench": 4377, "seedbench": 14233, "mmstar": 1500, "ai2d": 3088, "textvqa": 10000,
                   "mathvista": 1000, "pope": 8910}
GPUS = {"H100": (989e12, 3.35e12), "H200": (989e12, 4.8e12), "A100": (312e12, 2.0e12)}  # bf16 dense FLOP/s, HBM B/s


@dataclass
class Config:
    rows: int = 96  # MMBench rows of the toy world
    batch_size: int = 16
    style: str = "paper"  # paper (16 new tokens) | standard (128)
    max_new_tokens: int = 0  # 0 = the style's
    gpu: str = "H100"  # the projection's GPU
    mfu: float = 0.4  # the projection's share of peak FLOP/s in prefill
    threads: int = 1  # a tiny model on a shared CPU runs best on one thread


def timed_run(net, tok, items, cfg, batch_size, out):
    run = E.Config(out=out, batch_size=batch_size, workers=0, max_new_tokens=cfg.max_new_tokens)
    t0 = time.perf_counter()
    rows = E.run_bench(net, tok, "mmbench", cfg.style, [dict(it) for it in items], run, 0, 1, torch.device("cpu"),
                       "qwen2", None)
    return time.perf_counter() - t0, rows


def projection(gpu: str, mfu: float, new_tokens: float, batch: int) -> dict:
    """Seconds for the paper benchmarks on one GPU, bf16, SFT shapes: 729 image tokens per image (27x27, no pooling),
    ~80 prompt text tokens, SigLIP-so400m (0.43B) + Qwen2.5-1.5B (1.54B). Prefill is compute-bound at `mfu`; each
    decode step of a batch reads all LLM weights once (memory-bound at 70% of HBM bandwidth) plus its KV cache."""
    flops, bw = GPUS[gpu]
    vision, llm, n_img, n_text = 0.43e9, 1.54e9, 729, 80
    prefill = 2 * vision * n_img + 2 * llm * (n_img + n_text)  # FLOPs per question
    kv = 28 * 2 * 2 * 128 * 2 * (n_img + n_text)  # bytes per question: layers x (k, v) x kv heads x head dim x bf16
    step = (2 * llm + batch * kv) / (0.7 * bw)  # one decode step for a batch
    q = sum(PAPER_QUESTIONS.values())
    t_prefill, t_decode = q * prefill / (mfu * flops), q / batch * new_tokens * step
    return {"questions": q, "prefill_s": t_prefill, "decode_s": t_decode, "total_s": t_prefill + t_decode,
            "per_question_ms": 1e3 * (t_prefill + t_decode) / q}


def main():
    cfg = M.parse_config(Config)
    torch.set_num_threads(cfg.threads)
    import toyworld
    world = toyworld.ensure()
    tok = M.Tokenizer(os.path.join(world, "tokenizer.json"))
    net = M.VLM(M.preset("tiny", vocab_size=len(tok))).init_weights(seed=0).eval()
    items = E.load_bench("mmbench", os.path.join(world, "eval", "MMBench_DEV_EN.tsv"))[:cfg.rows]
    train.setup()
    tmp = tempfile.mkdtemp()
    try:
        timed_run(net, tok, items[:cfg.batch_size], cfg, cfg.batch_size, os.path.join(tmp, "warm"))
        t_b, batched = timed_run(net, tok, items, cfg, cfg.batch_size, os.path.join(tmp, "batched"))
        t_1, single = timed_run(net, tok, items, cfg, 1, os.path.join(tmp, "single"))
    finally:
        shutil.rmtree(tmp)
        torch.distributed.destroy_process_group()
    same = sum(a["output"] == b["output"] for a, b in zip(batched, single))
    n = len(items)
    print(f"tiny model, toy MMBench, {cfg.style} style ({cfg.max_new_tokens or E.MAX_NEW_TOKENS[cfg.style]} new "
          f"tokens at most), {n} rows, {cfg.threads} thread(s):")
    print(f"  batched (batch {cfg.batch_size}, length buckets): {n / t_b:7.1f} samples/s")
    print(f"  one row at a time:                   {n / t_1:7.1f} samples/s   -> batched is {t_1 / t_b:.1f}x")
    print(f"  identical outputs: {same}/{n}")
    avg_new = sum(len(tok.encode(r["output"])) for r in batched) / n
    for new, what in ((16, "paper style, 16 tokens (every step run: the batch waits for its longest row)"),
                      (128, "standard style, up to 128 tokens (worst case)")):
        p = projection(cfg.gpu, cfg.mfu, new, 16)
        print(f"projected, 8 paper benchmarks ({p['questions']:,} questions) on one {cfg.gpu}, batch 16, {what}: "
              f"{p['total_s'] / 60:.1f} min (prefill {p['prefill_s'] / 60:.1f} min at {cfg.mfu:.0%} MFU, decode "
              f"{p['decode_s'] / 60:.1f} min memory-bound), {p['per_question_ms']:.1f} ms/question")
    print(f"  (assumptions: bf16, 729 image tokens per image and ~80 text tokens per prompt, SigLIP-so400m + "
          f"Qwen2.5-1.5B, decode at 70% of HBM bandwidth; the tiny run here averaged {avg_new:.1f} new tokens)")
    return {"batched_sps": n / t_b, "single_sps": n / t_1, "speedup": t_1 / t_b, "identical": same, "rows": n}


def gpu_section_eval(smoke: bool) -> dict:
    """On a GPU: the paper-shaped VLM (random weights, bf16, 729 image tokens) generating 16 tokens for MMBench-like
    prompts, batched (16) against one at a time, token-identical outputs required; projects the 8 benchmarks."""
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    c = M.preset("paper" if dev.type == "cuda" else "tiny")
    c.image_tokens = (c.vision.image_size // c.vision.patch_size) ** 2  # SFT: no pooling
    with torch.device(dev):
        net = M.VLM(c).to(torch.bfloat16 if dev.type == "cuda" else torch.float32).eval()
    for p in net.parameters():  # N(0, 0.02) without init_weights' per-tensor loop over a 2B model on the host
        torch.nn.init.normal_(p, std=0.02)
    g = torch.Generator(device="cpu").manual_seed(0)
    n, batch = (32, 16) if smoke else (256, 16)
    prompts = [[1, M.IMAGE_ID] + torch.randint(3, 1000, (int(torch.randint(40, 120, (1,), generator=g)),),
                                               generator=g).tolist() for _ in range(n)]
    prompts.sort(key=len)  # length buckets, as eval.py
    s = c.vision.image_size
    pix = torch.randn(n, 3, s, s, generator=g).to(dev, net.vision.pos_embed.dtype)

    def run(bs):
        torch.cuda.synchronize() if dev.type == "cuda" else None
        t0, out = time.perf_counter(), []
        for i in range(0, n, bs):
            out += net.generate(prompts[i:i + bs], pix[i:i + bs], 16, keep_stop=True)
        torch.cuda.synchronize() if dev.type == "cuda" else None
        return time.perf_counter() - t0, out
    run(batch)  # warm-up
    t_b, out_b = run(batch)
    t_1, out_1 = run(1)
    proj = projection("H100", 0.4, 16, batch)
    q = sum(PAPER_QUESTIONS.values())
    return {"device": torch.cuda.get_device_name() if dev.type == "cuda" else "cpu (tiny preset)", "rows": n,
            "batched_samples_per_s": n / t_b, "single_samples_per_s": n / t_1, "speedup": t_1 / t_b,
            "identical": sum(a == b for a, b in zip(out_b, out_1)), "measured_paper_benchmarks_min": q / (n / t_b) / 60,
            "projected_h100_min": proj["total_s"] / 60}


if __name__ == "__main__":
    main()
