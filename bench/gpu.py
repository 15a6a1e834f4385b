"""
The one prepared GPU check (../shared/design/gpu-review.md): one process, sections in order, each under its own
time cap; a failure or a time-out ends only its own section. Every result is printed as soon as it is known and
OUT/summary.json gets, per section, its numbers (and "error" if it failed), rewritten after every section. Work
files (a toy world, packed rows) go to a temp dir, never to the results folder, and no run saves a checkpoint.

    python3 bench/gpu.py                                # everything: about 5 minutes on one H200, at most 6
    python3 bench/gpu.py --sections parity,attention    # only some (names below), e.g. to rerun what failed
    python3 bench/gpu.py --sections sft,eval,filter     # the stages' own sections: about 3 minutes, at most 5.5
    python3 bench/gpu.py --smoke                        # every section at tiny shapes, on a CPU: tests/test_gpu.py

Sections: env (versions, device, bf16 matmul peak, an NCCL world-of-one all-reduce), data (a toy world packed at
4096/144), parity (compiled flex vs the per-document SDPA loop, fp32 and bf16, outputs and gradients; a 2-layer
Qwen2's loss and grad norm, flex vs docs and compiled vs eager; recompiles and graph breaks), attention (a
microbenchmark: SDPA causal, flex causal, flex document mask, varlen_attn if present, the docs loop; block-mask
creation eager vs compiled), throughput and compiled (the paper preset, random init, world of one: tokens/s, MFU
against the spec and the measured peak, peak memory, data wait). A new section is one function `name(ctx, res)`
that fills `res` with numbers, and one row of SECTIONS. Nothing imported here imports webdataset (the GPU machine
has none) and only torch 2.11 APIs are used.
"""
from __future__ import annotations

import gc
import inspect
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, replace

import torch
import torch._dynamo
import torch.distributed as dist

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
import model as M  # noqa: E402
import train  # noqa: E402


@dataclass
class Config:
    sections: str = ""  # comma-separated section names; "" = the six core ones (smoke: all), in SECTIONS' order
    smoke: bool = False  # tiny shapes whatever the device: the CPU test of this script
    out: str = ""  # results folder (summary.json only); "" = $OUT if set, else ./gpu-check
    steps: int = 0  # timed steps per throughput run, after 2 warm-up steps; 0 = 6 (smoke: 2)


# The paper's shapes, and tiny ones for --smoke. heads: query heads, KV heads, head dim (Qwen2.5-1.5B's).
PAPER = dict(seq=4096, image_tokens=144, n_pool=6000, rows=4, heads=(12, 2, 128), preset="paper", global_batch=16,
             micro_batch=4, workers=6, steps=6, flags=[])
SMOKE = dict(seq=512, image_tokens=16, n_pool=400, rows=2, heads=(12, 2, 128), preset="tiny", global_batch=4,
             micro_batch=2, workers=0, steps=2, flags=["--attention", "mask"])  # CPU: flex has no backward


class Ctx:
    """What sections share: the config, the shapes, the device, a work dir, and the packed data (built once, by the
    first section that needs it)."""

    def __init__(self, cfg: Config):
        self.cfg, self.shape = cfg, SMOKE if cfg.smoke else PAPER
        self.cuda = torch.cuda.is_available()
        self.device = torch.device("cuda" if self.cuda else "cpu")
        self.dtype = torch.bfloat16 if self.cuda else torch.float32  # what training runs in here
        self.work = tempfile.mkdtemp(prefix="gpu-check-")
        self.packed = None

    def data(self) -> tuple[str, str, dict]:
        """(packed dir, tokenizer.json, pack stats) of a toy world packed at the shapes' seq / image tokens."""
        if self.packed is None:
            import pack
            import toyworld
            world = os.path.join(self.work, "world")
            toyworld.build(world, seed=0, n_pool=self.shape["n_pool"], n_sft=200, n_eval=60)
            out, tok = os.path.join(self.work, "packed"), os.path.join(world, "tokenizer.json")
            stats = pack.main(["--input", os.path.join(world, "pool"), "--output", out, "--tokenizer", tok,
                               "--seq-len", str(self.shape["seq"]), "--image-tokens", str(self.shape["image_tokens"])])
            self.packed = out, tok, stats
        return self.packed

    def doc_lens(self, n: int, first: int = 0) -> list[list[int]]:
        """Document lengths (image tokens expanded, padding as a last segment) of n real packed rows."""
        packed, _, _ = self.data()
        rows = train.Rows(packed, 0).read(first, n)
        return M.collate_rows(rows, self.shape["image_tokens"], self.shape["seq"], 0)["doc_lens"]

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize()

    def time(self, fn, reps: int = 5) -> float:
        """Median seconds per call, after one warm-up call (which compiles what needs compiling)."""
        fn()
        times = []
        for _ in range(reps):
            self.sync()
            t = time.perf_counter()
            fn()
            self.sync()
            times.append(time.perf_counter() - t)
        return statistics.median(times)


def say(section: str, what: str, value, unit: str = ""):
    print(f"  {section:>10} | {what:<34} {value:>12.4g} {unit}" if isinstance(value, float) else
          f"  {section:>10} | {what:<34} {value!s:>12} {unit}", flush=True)


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


# -----------------------------------------------------------------------------------------------------------------
# Sections: each fills `res` with numbers as it measures them, so a time-out keeps what came before it.


def env(ctx: Ctx, res: dict):
    name = torch.cuda.get_device_name() if ctx.cuda else "cpu"
    print(f"  torch {torch.__version__}, CUDA {torch.version.cuda}, {name}, python {sys.version.split()[0]}")
    if shutil.which("nvidia-smi"):
        print("  " + subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,clocks.max.sm,driver_version",
                                     "--format=csv,noheader"], capture_output=True, text=True).stdout.strip())
    from torch.nn.attention.flex_attention import flex_attention  # noqa: F401  (an ImportError fails the section)
    res["varlen_attn"] = float(_varlen() is not None)
    say("env", "varlen_attn present", res["varlen_attn"])
    for path in ("/tmp", "/dev/shm"):
        if os.path.isdir(path):
            res[f"free_gb {path}"] = shutil.disk_usage(path).free / 1e9
            say("env", f"free disk {path}", res[f"free_gb {path}"], "GB")
    res["spec_tflops"] = train.GPU_PEAK_TFLOPS.get(name, 0.0)
    res["matmul_tflops"] = train.matmul_peak(ctx.device, torch.bfloat16) / 1e12
    say("env", f"bf16 matmul peak (spec {res['spec_tflops']:.0f})", res["matmul_tflops"], "TFLOP/s")
    t = time.perf_counter()
    train.setup()  # the training code's own init: NCCL on a GPU, gloo on a CPU
    try:
        x = torch.ones(1 << 20, device=ctx.device)
        dist.all_reduce(x)
        res["allreduce_ok"] = float(bool((x == 1).all()))
    finally:
        dist.destroy_process_group()
    res["dist_init_allreduce_s"] = time.perf_counter() - t
    say("env", f"{dist.Backend.NCCL if ctx.cuda else 'gloo'} world-of-one all-reduce ok", res["allreduce_ok"])


def data(ctx: Ctx, res: dict):
    t = time.perf_counter()
    _, _, stats = ctx.data()
    res.update(rows=float(stats["rows"]), fill=stats["fill"], docs=float(stats["docs_out"]),
               seconds_to_build=time.perf_counter() - t)
    lens = ctx.doc_lens(min(16, stats["rows"]))
    res["docs_per_row"] = statistics.mean(len(d) for d in lens)
    for k in ("rows", "fill", "docs_per_row", "seconds_to_build"):
        say("data", k, res[k])


def parity(ctx: Ctx, res: dict):
    """Compiled flex against the per-document SDPA loop: 2 real rows and 2 of long documents (full blocks)."""
    T, (hq, hkv, hd), dev = ctx.shape["seq"], ctx.shape["heads"], ctx.device
    backward = ctx.cuda  # flex has no backward on a CPU
    lens = ctx.doc_lens(2) + [[T // 2 + 64, T // 4 + 32, T // 4 - 96]] * 2
    torch.manual_seed(0)
    q, k, v = (torch.randn(len(lens), h, T, hd, device=dev) for h in (hq, hkv, hkv))
    grad_out = torch.randn_like(q)
    docs, flex = M.make_attention(lens, dev, "docs"), M.make_attention(lens, dev, "flex")

    def run(attn, dtype):  # output and dq, dk, dv (on a CPU: the output only)
        x = [t.to(dtype).requires_grad_(backward) for t in (q, k, v)]
        with torch.set_grad_enabled(backward):
            o = M.attend(*x, attn)
            if backward:
                o.backward(grad_out.to(dtype))
        return [o.detach()] + [t.grad for t in x if backward]

    ref = run(docs, torch.float32)
    f32, f16, d16 = run(flex, torch.float32), run(flex, torch.bfloat16), run(docs, torch.bfloat16)
    res["fp32_out_rel"] = rel(f32[0], ref[0])
    say("parity", "flex vs docs fp32: output rel err", res["fp32_out_rel"])
    if backward:
        res["fp32_grad_rel"] = max(rel(a, b) for a, b in zip(f32[1:], ref[1:]))
        say("parity", "flex vs docs fp32: max dq/dk/dv rel", res["fp32_grad_rel"])
    res["bf16_err_ratio"] = max(rel(a, r) / rel(b, r) for a, b, r in zip(f16, d16, ref))
    say("parity", "bf16 error, flex / SDPA-docs (<= 2)", res["bf16_err_ratio"])
    res["attention_ok"] = float(res["fp32_out_rel"] < 1e-4 and res.get("fp32_grad_rel", 0) < 1e-4
                                and res["bf16_err_ratio"] <= 2)

    # a 2-layer Qwen2 at the paper's width (smoke: the tiny preset's), fp32: loss and grad norm per attention path
    c = replace(M.preset("tiny").llm if ctx.cfg.smoke else M.QwenConfig(vocab_size=16384), num_layers=2)
    torch.manual_seed(0)
    net = M.Qwen2(c).to(dev)
    lens = ctx.doc_lens(2)
    ids = torch.randint(0, c.vocab_size, (2, T), device=dev)
    targets = torch.cat([ids[:, 1:], torch.full((2, 1), M.IGNORE, device=dev)], 1)
    positions = M.position_ids_from_lens(lens, dev)

    def loss_gnorm(attn):
        net.zero_grad(set_to_none=True)
        with torch.set_grad_enabled(backward or attn.kind != "flex"):
            loss = net(ids, positions=positions, attn=attn, targets=targets) / (T * 2)
            if not loss.requires_grad:
                return loss.item(), None
            loss.backward()
        return loss.item(), float(torch.nn.utils.clip_grad_norm_(net.parameters(), float("inf")))

    (ld, gd), (lf, gf) = (loss_gnorm(M.make_attention(lens, dev, kind)) for kind in ("docs", "flex"))
    res["model_loss_rel_flex_docs"] = abs(lf - ld) / abs(ld)
    say("parity", "2-layer loss, flex vs docs", res["model_loss_rel_flex_docs"])
    if gf is not None:
        res["model_gnorm_rel_flex_docs"] = abs(gf - gd) / gd
        say("parity", "2-layer grad norm, flex vs docs", res["model_gnorm_rel_flex_docs"])
    from torch._dynamo.utils import counters
    counters.clear()
    for layer in net.layers:
        layer.compile()
    lc, gc_ = loss_gnorm(M.make_attention(lens, dev, "flex"))
    frames = counters["frames"]["total"]
    loss_gnorm(M.make_attention(ctx.doc_lens(2, first=2), dev, "flex"))  # other documents, same shapes
    res["model_loss_rel_compiled_eager"] = abs(lc - lf) / abs(lf)
    say("parity", "2-layer loss, compiled vs eager", res["model_loss_rel_compiled_eager"])
    if gc_ is not None:
        res["model_gnorm_rel_compiled_eager"] = abs(gc_ - gf) / gf
        say("parity", "2-layer grad norm, compiled vs eager", res["model_gnorm_rel_compiled_eager"])
    res["model_ok"] = float(max(v for k, v in res.items() if k.startswith("model_")) < 1e-3)  # CPU: see tests
    res["recompiles_new_docs"] = float(counters["frames"]["total"] - frames)
    res["graph_breaks"] = float(sum(counters["graph_break"].values()))
    res["unique_graphs"] = float(counters["stats"]["unique_graphs"])
    for k in ("model_ok", "recompiles_new_docs", "graph_breaks", "unique_graphs"):
        say("parity", k, res[k])


def _varlen():
    try:
        from torch.nn.attention.varlen import varlen_attn
        return varlen_attn
    except ImportError:
        return None


def attention(ctx: Ctx, res: dict):
    """Forward and backward (a CPU: flex forward only) at B rows of T, the paper's heads, in the training dtype."""
    B, T, (hq, hkv, hd), dev = ctx.shape["rows"], ctx.shape["seq"], ctx.shape["heads"], ctx.device
    lens = ctx.doc_lens(B)
    torch.manual_seed(0)
    q, k, v = (torch.randn(B, h, T, hd, device=dev, dtype=ctx.dtype, requires_grad=ctx.cuda) for h in (hq, hkv, hkv))
    flex_docs = M.make_attention(lens, dev, "flex")  # also compiles flex and create_block_mask once

    def step(fn):
        def go():
            with torch.set_grad_enabled(ctx.cuda):
                o = fn()
            if ctx.cuda:
                o.sum().backward()
        return go

    from torch.nn.attention.flex_attention import create_block_mask
    doc = torch.stack([torch.repeat_interleave(torch.arange(len(d)), torch.tensor(d)) for d in lens]).to(dev)
    for name, fn in (("block_mask_eager", create_block_mask), ("block_mask_compiled", M._create_block_mask)):
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated() if ctx.cuda else 0
        res[name + "_ms"] = ctx.time(lambda fn=fn: fn(lambda b, h, i, j: (doc[b, i] == doc[b, j]) & (i >= j), B, None,
                                                      T, T, device=dev), reps=3) * 1e3
        say("attention", name, res[name + "_ms"], "ms")
        if ctx.cuda:
            res[name + "_mib"] = (torch.cuda.max_memory_allocated() - before) / 2**20
            say("attention", name + " peak extra memory", res[name + "_mib"], "MiB")
    causal_mask = M._create_block_mask(lambda b, h, i, j: i >= j, B, None, T, T, device=dev)
    cases = {"sdpa_causal": lambda: M.attend(q, k, v, M.Attention("causal")),
             "flex_causal": lambda: M.attend(q, k, v, M.Attention("flex", block_mask=causal_mask)),
             "flex_docs": lambda: M.attend(q, k, v, flex_docs),
             "docs_loop": lambda: M.attend(q, k, v, M.make_attention(lens, dev, "docs"))}
    varlen = _varlen()
    if varlen is not None and ctx.cuda:  # one sequence per document, flash-attention's varlen kernel; last: its
        # signature changed between torch 2.10 (is_causal) and 2.12 (window_size, enable_gqa)
        ends = torch.tensor([x for d in lens for x in d]).cumsum(0)
        cu = torch.cat([torch.zeros(1, dtype=ends.dtype), ends]).to(dev, torch.int32)
        longest = max(x for d in lens for x in d)
        params = inspect.signature(varlen).parameters
        gqa = "enable_gqa" in params
        kw = {"is_causal": True} if "is_causal" in params else {"window_size": (-1, 0)}
        kw |= {"enable_gqa": True} if gqa else {}

        def var():
            qq, kk, vv = (t.transpose(1, 2).reshape(B * T, -1, hd) for t in (q, k, v))
            if not gqa:
                kk, vv = (t.repeat_interleave(hq // hkv, dim=1) for t in (kk, vv))
            return varlen(qq, kk, vv, cu, cu, longest, longest, **kw)
        cases["varlen_docs"] = var
    for name, fn in cases.items():
        res[name + "_ms"] = ctx.time(step(fn)) * 1e3
        say("attention", name + (" fwd+bwd" if ctx.cuda else " fwd"), res[name + "_ms"], "ms")


THROUGHPUT = [("doc_mask_ac", []), ("causal_ac", ["--no-doc-mask"]), ("doc_mask_no_ac", ["--no-ac"])]
COMPILED = [("compiled_doc_mask_ac", ["--compile"]), ("compiled_causal_ac", ["--compile", "--no-doc-mask"])]


def train_runs(ctx: Ctx, res: dict, runs: list):
    """train.py itself, --save false, at the shapes' preset with random init, world of one: medians of the timed
    steps."""
    packed, tok, _ = ctx.data()
    s = ctx.shape
    for name, extra in runs[:1] if ctx.cfg.smoke and runs is COMPILED else runs:
        argv = ["--preset", s["preset"], "--vision", "", "--llm", "", "--data", packed, "--tokenizer", tok,
                "--seq-len", str(s["seq"]), "--image-tokens", str(s["image_tokens"]), "--global-batch",
                str(s["global_batch"]), "--micro-batch", str(s["micro_batch"]), "--workers", str(s["workers"]),
                "--steps", str(2 + (ctx.cfg.steps or s["steps"])), "--save", "false", "--log-every", "1000", "--ac",
                "--out", os.path.join(ctx.work, name), *s["flags"], *extra]
        if ctx.cuda:
            torch.cuda.reset_peak_memory_stats()
        t = time.perf_counter()
        recs = train.main(argv)[2:]
        out = {"tok_s": statistics.median(r["tokens"] / r["time"] for r in recs),
               "mfu_spec": statistics.median(r["mfu"] for r in recs),
               "mfu_measured": statistics.median(r["mfu_measured"] for r in recs),
               "data_wait": statistics.median(r["data_wait"] for r in recs), "loss": recs[-1]["loss"],
               "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if ctx.cuda else 0.0,
               "run_s": time.perf_counter() - t}
        res.update({f"{name}.{k}": v for k, v in out.items()})
        print(f"  {name:>22}: {out['tok_s']:9,.0f} tok/s  MFU {out['mfu_spec']:6.1%} spec {out['mfu_measured']:6.1%} "
              f"measured  peak {out['peak_gib']:5.1f} GiB  data-wait {out['data_wait']:5.1%}  loss {out['loss']:.3f}  "
              f"({out['run_s']:.0f} s)", flush=True)
        gc.collect()
        if ctx.cuda:
            torch.cuda.empty_cache()
    if "doc_mask_ac.tok_s" in res and not ctx.cfg.smoke:  # 5B tokens at the document-masked, AC speed
        res["gpu_hours_5b"] = 5e9 / res["doc_mask_ac.tok_s"] / 3600
        say("throughput", "projected GPU-hours for 5B tokens", res["gpu_hours_5b"], "h")


def stage_section(name: str):
    """A stage's own GPU section, `gpu_section_NAME(smoke) -> dict` in bench/NAME.py, loaded by path (a plain
    `import eval` would find the top-level eval.py) only when the section runs."""
    import importlib.util

    def run(ctx: Ctx, res: dict):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", os.path.join(REPO, "bench", f"{name}.py"))
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        for k, v in getattr(mod, f"gpu_section_{name}")(ctx.cfg.smoke).items():
            res[k] = float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v
            say(name, k, res[k])
    return run


SECTIONS = {  # name: (function, estimate on one H200 in s, time cap in s); the first six's caps add up to 6 minutes
    "env": (env, 10, 15),
    "data": (data, 15, 30),
    "parity": (parity, 70, 95),
    "attention": (attention, 25, 40),
    "throughput": (lambda ctx, res: train_runs(ctx, res, THROUGHPUT), 70, 80),
    "compiled": (lambda ctx, res: train_runs(ctx, res, COMPILED), 100, 100),
    "sft": (stage_section("sft"), 60, 120),  # SFT at seq 4096, 729 tokens per image
    "eval": (stage_section("eval"), 60, 120),  # batched KV-cache generation at the paper's shapes
    "filter": (stage_section("filter"), 40, 90),  # SigLIP-so400m and MLM-Filter scoring throughput
}
CORE = ["env", "data", "parity", "attention", "throughput", "compiled"]  # the default run: at most 6 minutes


class Timeout(Exception):
    pass


def _alarm(signum, frame):
    raise Timeout("over the section's time cap")


def main(argv=None) -> dict:
    cfg = M.parse_config(Config, argv)
    names = [n for n in cfg.sections.split(",") if n] or (list(SECTIONS) if cfg.smoke else CORE)
    if unknown := [n for n in names if n not in SECTIONS]:
        raise SystemExit(f"unknown sections {unknown} (known: {', '.join(SECTIONS)})")
    out = cfg.out or os.environ.get("OUT") or os.path.join(REPO, "gpu-check")
    os.makedirs(out, exist_ok=True)
    ctx = Ctx(cfg)
    os.environ.setdefault("NCCL_SOCKET_IFNAME", "lo")  # one process on one machine: loopback always works
    dyn = torch._dynamo.config  # every section compiles at its own shapes: never fall back to eager for that
    setattr(dyn, "recompile_limit" if hasattr(dyn, "recompile_limit") else "cache_size_limit", 64)
    print(f"gpu check: {', '.join(names)} on {ctx.device}{' (smoke)' if cfg.smoke else ''}; estimates on one H200: "
          + ", ".join(f"{n} ~{SECTIONS[n][1]} s (cap {SECTIONS[n][2]})" for n in names)
          + f"; total ~{sum(SECTIONS[n][1] for n in names) / 60:.1f} min, at most "
          f"{sum(SECTIONS[n][2] for n in names) / 60:.1f}", flush=True)
    summary = {"device": torch.cuda.get_device_name() if ctx.cuda else "cpu", "torch": torch.__version__,
               "smoke": cfg.smoke}
    signal.signal(signal.SIGALRM, _alarm)
    try:
        for name in names:
            fn, _, cap = SECTIONS[name]
            print(f"[{name}]", flush=True)
            res, t = {}, time.perf_counter()
            signal.setitimer(signal.ITIMER_REAL, cap * (20 if cfg.smoke else 1))  # a 2-core CPU compiles slowly
            try:
                fn(ctx, res)
            except Exception as e:  # Timeout included: the next section still runs
                res["error"] = f"{type(e).__name__}: {e}"[:800]
                traceback.print_exc()
                torch._dynamo.reset()  # nothing half-compiled is left for the next section
            finally:
                signal.setitimer(signal.ITIMER_REAL, 0)
                if dist.is_initialized():
                    dist.destroy_process_group()
            res["seconds"] = time.perf_counter() - t
            summary[name] = res
            print(f"[{name}] {'FAILED: ' + res['error'] if 'error' in res else 'ok'} in {res['seconds']:.0f} s",
                  flush=True)
            M.write_json(os.path.join(out, "summary.json"), summary)
    finally:
        shutil.rmtree(ctx.work, ignore_errors=True)
    print(json.dumps({n: {k: v for k, v in summary[n].items()} for n in names}, indent=1))
    return summary


if __name__ == "__main__":
    main()
