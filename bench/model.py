"""
CPU benchmark of our Qwen2 (model.py) against transformers' Qwen2ForCausalLM: same weights, same inputs, one process,
the two sides run in turn (timings on a shared 2-core machine are noisy, so: medians over --repeats runs, and the
ratio is the median over back-to-back pairs, which cancels most bursts of load from other processes).
  1. Training step (forward + backward) tokens/s, with fp32 and with bf16 weights:
     row "text": every position supervised, both sides compute full-vocab logits (the like-for-like case);
     row "image": the first --image-frac of the row unsupervised, as in a pre-training row of image tokens. Our head
     skips those positions, transformers computes logits everywhere: a design gain, not raw kernel speed.
  2. Greedy generation tokens/s: VLM.generate (text only) against transformers' generate. Tokens must be identical
     in fp32 (asserted); the bf16 column shows how many match.
Usage: python bench/model.py [--layers 8] [--vocab 16384] [--repeats 5] [--threads 2] ...  (--help lists them)
"""
import copy
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import torch  # noqa: E402
import transformers  # noqa: E402

import model as M  # noqa: E402

transformers.utils.logging.disable_progress_bar()


@dataclass
class Bench:
    """Ours vs transformers' Qwen2 on CPU: training-step and greedy-generation tokens/s."""
    hidden: int = 512
    layers: int = 6
    heads: int = 8
    kv_heads: int = 2
    intermediate: int = 1408
    vocab: int = 16384  # the real 151,936 would make the head dominate everything (machine.md)
    seq: int = 1024
    batch: int = 1
    image_frac: float = 0.85  # unsupervised share of the "image" training row
    prompt: int = 128
    new_tokens: int = 64
    gen_batch: str = "1,4"  # generation batch sizes, comma-separated
    repeats: int = 7
    threads: int = 0  # 0: torch's default
    train: bool = True  # --no-train: generation only
    generate: bool = True  # --no-generate: training step only


def interleaved(fns: dict, repeats: int, warmup: int = 1) -> dict:
    """{name: fn} -> {name: median seconds}, the sides in turn, alternating which goes first. With two sides, also
    "ratio": the median over repeats of t[second] / t[first], each pair measured back to back."""
    names = list(fns)
    for _ in range(warmup):
        for n in names:
            fns[n]()
    times = {n: [] for n in names}
    for r in range(repeats):
        for n in names[:: 1 if r % 2 == 0 else -1]:
            t = time.perf_counter()
            fns[n]()
            times[n].append(time.perf_counter() - t)
    out = {n: statistics.median(t) for n, t in times.items()}
    if len(names) == 2:
        out["ratio"] = statistics.median(b / a for a, b in zip(times[names[0]], times[names[1]]))
    return out


def gflops(dtype, n: int = 2048) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    return 2 * n**3 / interleaved({"mm": lambda: a @ b}, 7, warmup=2)["mm"] / 1e9


def cast(net, dtype):  # Module.to() works in place: cast a copy, keep the fp32 originals
    return net if dtype == torch.float32 else copy.deepcopy(net).to(dtype)


def train_row(ours, hf, ids, labels, repeats):
    """Forward + backward of one batch on both sides -> (timings, |loss difference|). labels: HF's (unshifted)."""
    targets = torch.cat([labels[:, 1:], torch.full_like(labels[:, :1], M.IGNORE)], 1)  # ours: already shifted
    count = (targets != M.IGNORE).sum()  # ours returns the sum of the token losses

    def step_ours():
        ours.zero_grad(set_to_none=True)
        loss = ours(ids, targets=targets) / count
        loss.backward()
        return loss.item()

    def step_hf():
        hf.zero_grad(set_to_none=True)
        loss = hf(input_ids=ids, labels=labels, use_cache=False).loss  # its mean CE over the supervised positions
        loss.backward()
        return loss.item()

    diff = abs(step_ours() - step_hf())
    return interleaved({"ours": step_ours, "hf": step_hf}, repeats), diff


def generation(vlm, hf, prompt, n, repeats):
    """Greedy decoding of n tokens on both sides -> (timings, tokens of ours, tokens of HF)."""
    def gen_ours():
        return vlm.generate(prompt.tolist(), None, max_new_tokens=n)

    def gen_hf():
        out = hf.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=n, min_new_tokens=n,
                          do_sample=False, pad_token_id=0)
        return out[:, prompt.shape[1]:].tolist()

    with torch.no_grad():
        a, b = gen_ours(), gen_hf()
        return interleaved({"ours": gen_ours, "hf": gen_hf}, repeats), a, b


cfg = M.parse_config(Bench)
if cfg.threads:
    torch.set_num_threads(cfg.threads)
print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
      f"CPU {torch.backends.cpu.get_cpu_capability()}, load average {os.getloadavg()[0]:.1f}")
print(f"2048^3 matmul: fp32 {gflops(torch.float32):.0f} GFLOP/s, bf16 {gflops(torch.bfloat16):.0f} GFLOP/s (again at the "
      "end; half of an idle run's figure means another process held a core)")

torch.manual_seed(0)
hf_cfg = transformers.Qwen2Config(vocab_size=cfg.vocab, hidden_size=cfg.hidden, intermediate_size=cfg.intermediate,
                                  num_hidden_layers=cfg.layers, num_attention_heads=cfg.heads,
                                  num_key_value_heads=cfg.kv_heads, max_position_embeddings=max(cfg.seq, 4096),
                                  rope_theta=1e6, tie_word_embeddings=True, attn_implementation="sdpa")
hf32 = transformers.Qwen2ForCausalLM(hf_cfg)
with torch.no_grad():  # HF zero-inits the q/k/v biases; make them count
    for name, p in hf32.named_parameters():
        if name.endswith("bias"):
            p.normal_(0, 0.02)
with tempfile.TemporaryDirectory() as d:
    hf32.save_pretrained(d)
    ours32 = M.Qwen2.from_pretrained(d)
print(f"config: hidden {cfg.hidden}, {cfg.layers} layers, {cfg.heads} heads / {cfg.kv_heads} KV heads, intermediate "
      f"{cfg.intermediate}, vocab {cfg.vocab} (tied), {sum(p.numel() for p in ours32.parameters()) / 1e6:.1f}M "
      f"params; HF attention: {hf_cfg._attn_implementation}")
dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
ratios = {}

ids = torch.randint(0, cfg.vocab, (cfg.batch, cfg.seq))
image_labels = ids.clone()
image_labels[:, : int(cfg.image_frac * cfg.seq)] = M.IGNORE  # an image block, then its caption
rows = {"text (all supervised)": ids, f"image ({cfg.image_frac:.0%} unsupervised)": image_labels}
if cfg.train:
    print(f"\ntraining step (forward+backward, batch {cfg.batch} x seq {cfg.seq}), tokens/s (median of {cfg.repeats}):")
    print(f"  {'dtype':5} {'row':26} {'ours':>7} {'HF':>7} {'ours/HF':>7}  |loss diff|")
for dn, dtype in dtypes.items() if cfg.train else ():
    ours, hf = cast(ours32, dtype).train(), cast(hf32, dtype).train()
    for row, labels in rows.items():
        t, diff = train_row(ours, hf, ids, labels, cfg.repeats)
        ratios[f"train {dn} {row.split()[0]}"] = t["ratio"]
        tok = cfg.batch * cfg.seq
        print(f"  {dn:5} {row:26} {tok / t['ours']:7.0f} {tok / t['hf']:7.0f} {t['ratio']:7.2f}  {diff:.1e}")
    ours.zero_grad(set_to_none=True), hf.zero_grad(set_to_none=True)

if cfg.generate:
    print(f"\ngreedy generation (prompt {cfg.prompt}, {cfg.new_tokens} new tokens), generated tokens/s (median of "
          f"{cfg.repeats}):")
    print(f"  {'dtype':5} {'batch':>5} {'ours':>7} {'HF':>7} {'ours/HF':>7}  tokens equal to HF's")
tiny_vision = M.VisionConfig(image_size=16, patch_size=8, hidden_size=8, intermediate_size=8, num_layers=1,
                             num_heads=1, use_head=False)
for dn, dtype in dtypes.items() if cfg.generate else ():
    ours, hf = cast(ours32, dtype).eval(), cast(hf32, dtype).eval()
    with torch.device("meta"):  # no images: the tower and projector stay unused, so skip initializing them
        vlm = M.VLM(M.VLMConfig(vision=tiny_vision, llm=ours.config, image_tokens=4)).eval()
    vlm.llm = ours
    for B in map(int, cfg.gen_batch.split(",")):
        prompt = torch.randint(0, cfg.vocab, (B, cfg.prompt))
        t, a, b = generation(vlm, hf, prompt, cfg.new_tokens, cfg.repeats)
        if dtype == torch.float32:
            assert a == b, "greedy tokens differ from transformers' in fp32"
        same = sum(x == y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / (B * cfg.new_tokens)
        ratios[f"generate {dn} batch {B}"] = t["ratio"]
        n = B * cfg.new_tokens
        print(f"  {dn:5} {B:5} {n / t['ours']:7.1f} {n / t['hf']:7.1f} {t['ratio']:7.2f}  {same:.0%}")

print("\nours/HF (median of back-to-back pairs; target >= 1.0, project goal >= 1.5):")
print("  " + ", ".join(f"{k} {v:.2f}" for k, v in ratios.items()))
print(f"2048^3 matmul at the end: fp32 {gflops(torch.float32):.0f} GFLOP/s, bf16 {gflops(torch.bfloat16):.0f} GFLOP/s, "
      f"load average {os.getloadavg()[0]:.1f}")
