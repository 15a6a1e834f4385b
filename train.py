"""
Pre-training (reference.md §3): frozen SigLIP, trainable projector and Qwen2, packed rows, raw FSDP2.

    python train.py                                          # tiny model, toy world (generated and packed once)
    torchrun --nproc_per_node=8 train.py --preset paper --data /data/packed --out runs/paper

The same flags mean the same training on 1 or N processes: a step is `global_batch` packed rows, each rank takes a
contiguous slice of them and splits it into micro-batches. Every row is addressed by its index in the run's order,
so the data position is one number and resuming is exact.
"""
from __future__ import annotations

import dataclasses
import glob
import json
import math
import os
import resource
import shutil
import subprocess
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

import model as M
import pack
import weights as W


@dataclass
class Config:
    preset: str = "tiny"  # tiny | paper; a preset fills the fields below, explicit flags win
    data: str = ""  # packed rows (pack.py output dir); "" = the toy world, generated and packed on first use
    out: str = "runs/pretrain"  # run dir: config.json, metrics.jsonl, checkpoints/, final/ (plain VLM)
    init: str = ""  # start from a saved VLM (save_pretrained dir) instead of --vision/--llm
    vision: str = ""  # SigLIP checkpoint dir or hub id; "" = random init
    vision_act: str = "gelu"  # the timm SigLIP the paper ran uses exact GELU; HF configs say gelu_pytorch_tanh
    llm: str = ""  # Qwen2 checkpoint dir or hub id; "" = random init
    tokenizer: str = ""  # tokenizer.json; default: the --llm's, the --init's or the toy world's
    image_tokens: int = 16  # per image after pooling: 144 in the paper's pre-training
    seq_len: int = 512  # tokens per packed row, images expanded (the data must be packed for it)
    global_batch: int = 16  # packed rows per optimizer step, all ranks together
    micro_batch: int = 8  # rows per forward on one rank
    steps: int = 0  # optimizer steps; 0 = one epoch over the packed rows
    lr: float = 2e-3  # peak learning rate (AdamW)
    weight_decay: float = 0.01  # AdamW's, on weight matrices only (not biases, norms)
    warmup: float = 0.03  # share of steps with linear warmup, then cosine to 0
    clip: float = 1.0  # gradient-norm clipping threshold
    train_vision: bool = False  # also train the SigLIP tower (frozen in the paper)
    vision_lr: float = 0.0  # with --train-vision: the tower's peak lr; 0 = --lr
    doc_mask: bool = True  # False = the paper's plain causal attention and positions over whole packed rows
    attention: str = "auto"  # auto | flex | docs | mask (how document masking is computed)
    precision: str = "auto"  # auto (bf16 on GPU, fp32 on CPU) | bf16 | fp32
    ac: bool = False  # activation checkpointing per decoder block (non-reentrant)
    compile: bool = False  # torch.compile per decoder block
    workers: int = 2  # dataloader workers per rank (decode and resize images)
    seed: int = 7  # the official seed
    ckpt_every: int = 0  # steps between checkpoints; 0 = only at the end
    keep: int = 2  # checkpoints kept
    save: bool = True  # False: nothing is written under --out (no config, metrics, checkpoints, final model)
    resume: str = ""  # "auto" = newest complete checkpoint in out/checkpoints, or a checkpoint dir
    log_every: int = 10  # steps between log lines
    peak_tflops: float = 0.0  # spec MFU denominator per device; 0 = the GPU table, else the measured matmul peak
    wandb: str = ""  # wandb project; used only if wandb is installed
    dry_run: bool = False  # print parameters, FLOPs per token and projected GPU-hours, then exit
    token_budget: float = 5e9  # dry run: tokens to train on (the paper: 5B)
    gpu_tflops: float = 312.0  # dry run: peak bf16 TFLOP/s of one GPU (A100: 312)
    gpu_mfu: float = 0.4  # dry run: assumed MFU

    def final_meta(self) -> dict:  # what final/config.json records besides the model and the stage (sft.py: its chat)
        return {}


PRESETS = {
    "tiny": dict(global_batch=8, lr=3e-3),  # the tower frozen, as in the paper; small fast steps: the toy LLM
    # starts using the image after ~120 steps (bench/looks.py), which 96 steps of 16 rows never reached
    "paper": dict(vision="google/siglip-so400m-patch14-384", llm="Qwen/Qwen2.5-1.5B-Instruct", image_tokens=144,
                  seq_len=4096, global_batch=512, micro_batch=8, lr=5e-5, ac=True),
}
REPO = os.path.dirname(os.path.abspath(__file__))
GPU_PEAK_TFLOPS = {  # dense bf16 spec, by the full name torch.cuda.get_device_name() reports
    "NVIDIA H200": 989.0, "NVIDIA H100 80GB HBM3": 989.0, "NVIDIA H200 NVL": 835.0, "NVIDIA H100 NVL": 835.0,
    "NVIDIA H100 PCIe": 756.0, "NVIDIA A100-SXM4-80GB": 312.0, "NVIDIA A100-SXM4-40GB": 312.0,
    "NVIDIA A100 80GB PCIe": 312.0, "NVIDIA A100-PCIE-40GB": 312.0, "NVIDIA L40S": 362.0, "NVIDIA A10": 125.0}


def print0(*a, **kw):
    if not dist.is_initialized() or dist.get_rank() == 0:
        print(*a, **kw, flush=True)


# -----------------------------------------------------------------------------------------------------------------
# Data: packed rows in a seeded order, read by index; a dataloader worker builds whole micro-batches.


class Rows:
    """The run's row order: each epoch visits the shards in a seeded permutation, rows in order within a shard
    (pack.py writes rows shuffled). Global row i is (epoch, shard, row), so any row can be read by its index."""

    def __init__(self, data_dir: str, seed: int):
        self.shards = pack.packed_shards(data_dir)
        if not self.shards:
            raise FileNotFoundError(f"{data_dir}: no finished packed shards (run pack.py first)")
        self.seed, self.total = seed, sum(n for _, n in self.shards)

    def read(self, start: int, count: int) -> list[dict]:
        out = []
        while len(out) < count:
            epoch, i = divmod(start + len(out), self.total)
            order = np.random.default_rng([self.seed, epoch]).permutation(len(self.shards))
            ends = np.cumsum([self.shards[j][1] for j in order])
            k = int(np.searchsorted(ends, i, side="right"))
            path, n = self.shards[order[k]]
            first = i - (ends[k] - n)
            for row in pack.iter_rows(path, int(first)):
                out.append(row)
                if len(out) == count or first + len(out) >= n:
                    break
        return out


def make_batch(rows: list[dict], cfg: Config, image_size: int, pad_id: int) -> dict:
    """Decode and squash images to uint8 (4x less to move than float), expand and pad token rows (to seq_len; with
    sft.py --no-pack, to the batch's longest row), and count what the loss and the logs need. A document with an
    image that fails to decode trains on nothing: zero pixels stand in for the image (the shapes must hold), all its
    targets are IGNORE, and it is counted (bad_docs). Both stages: never supervised text about a black image."""
    pixels, bad, n_bad = [], set(), 0  # bad: (row, document) pairs
    for r, row in enumerate(rows):
        ids = np.asarray(row["input_ids"])
        doc_of_image = np.repeat(np.arange(len(row["doc_lengths"])), row["doc_lengths"])[ids == M.IMAGE_ID]
        for data, d in zip(row["images"], doc_of_image.tolist()):
            try:
                pixels.append(M.image_to_uint8(M.load_image(data), image_size))
            except Exception:
                pixels.append(torch.zeros(3, image_size, image_size, dtype=torch.uint8))
                bad, n_bad = bad | {(r, d)}, n_bad + 1
    width = cfg.seq_len if getattr(cfg, "pack", True) else \
        max(len(r["input_ids"]) + (cfg.image_tokens - 1) * len(r["images"]) for r in rows)
    b = M.collate_rows(rows, cfg.image_tokens, width, pad_id)
    for r, d in bad:
        start = sum(b["doc_lens"][r][:d])
        b["targets"][r, start: start + b["doc_lens"][r][d]] = M.IGNORE
    docs = [d[: len(r["doc_lengths"])] for d, r in zip(b["doc_lens"], rows)]  # without the padding segment
    pairs = sum(sum(n * (n + 1) // 2 for n in d) if cfg.doc_mask else sum(d) * (sum(d) + 1) // 2 for d in docs)
    b.update(pixels=torch.stack(pixels) if pixels else torch.zeros(0, 3, image_size, image_size, dtype=torch.uint8),
             n_sup=int((b["targets"] != M.IGNORE).sum()), n_tokens=sum(map(sum, docs)), n_images=len(pixels),
             bad_images=n_bad, bad_docs=len(bad), attn_pairs=pairs, rows=[(r["shard"], r["row"]) for r in rows])
    return b


class MicroBatches(torch.utils.data.IterableDataset):
    """This rank's micro-batches from `start_step` on. Step s covers global rows [s*G, (s+1)*G); rank r takes
    [s*G + r*G/W, ...) in micro-batches. Worker w builds micro-batches m with m % workers == w, and the
    DataLoader returns them round-robin, i.e. in order. Nothing is duplicated or skipped across ranks/workers."""

    def __init__(self, rows: Rows, cfg: Config, rank: int, world: int, start_step: int, steps: int, image_size: int,
                 pad_id: int):
        self.rows, self.cfg, self.rank, self.world = rows, cfg, rank, world
        self.start_step, self.steps, self.image_size, self.pad_id = start_step, steps, image_size, pad_id

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        G, mb = self.cfg.global_batch, self.cfg.micro_batch
        per_rank = G // self.world
        for m, (step, j) in enumerate((s, j) for s in range(self.start_step, self.steps)
                                      for j in range(per_rank // mb)):
            if m % nw == wid:
                rows = self.rows.read(step * G + self.rank * per_rank + j * mb, mb)
                yield make_batch(rows, self.cfg, self.image_size, self.pad_id)


# -----------------------------------------------------------------------------------------------------------------
# Model, FSDP2, FLOPs


def build_model(cfg: Config, vocab: int, device) -> M.VLM:
    if cfg.init:
        net = W.load_vlm(M.need(cfg.init, "--init names a saved VLM (OUT/final)", "config.json", hub=True),
                         cfg.vision or None, cfg.llm or None, image_tokens=cfg.image_tokens)
    elif cfg.vision and cfg.llm:
        net = W.build_vlm(cfg.vision, cfg.llm, cfg.image_tokens, act=cfg.vision_act)
    elif cfg.llm:
        raise SystemExit("train: --llm needs --vision too (or --init); --vision alone keeps the preset's random LLM")
    else:  # random init, identical on every rank (same seed, full model), so any world size starts the same
        c = M.preset(cfg.preset, vocab_size=None if cfg.preset == "paper" else -(-vocab // 64) * 64)
        v = W.load_vision(cfg.vision, act=cfg.vision_act) if cfg.vision else None  # e.g. filter.py train's SigLIP
        c.vision = v.config if v else c.vision
        c.vision.use_head, c.vision.act, c.image_tokens = False, cfg.vision_act, cfg.image_tokens
        with torch.device(device):
            net = M.VLM(c)
        net.init_weights(cfg.seed)
        if v:
            net.vision.load_state_dict({k: t for k, t in v.state_dict().items() if not k.startswith("head.")})
    if vocab > net.config.llm.vocab_size:
        raise ValueError(f"tokenizer has {vocab} tokens, the model's embedding only {net.config.llm.vocab_size}")
    return net.to(device)


def shard_model(net: M.VLM, cfg: Config, dtype):
    """fully_shard every decoder block and the vision tower as one unit (one all-gather, torchtitan's choice), then
    the root (embeddings, projector, final norm, head). Params are gathered in `dtype`, gradients reduced in fp32."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
    net.vision.requires_grad_(cfg.train_vision)
    v = net.vision  # what the VLM never computes gets no gradient, so no optimizer state a resume could load: frozen
    for m in [*v.blocks[len(v.blocks) + 1 + net.config.feature_layer:], v.post_norm] + [v.head] * (v.head is not None):
        m.requires_grad_(False)
    if not cfg.train_vision:
        net.vision.to(dtype)  # frozen: store it in the compute dtype, it never sees an optimizer
    net.llm.checkpointing = cfg.ac
    mp = MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)
    for layer in net.llm.layers:
        if cfg.compile:
            layer.compile()
        fully_shard(layer, mp_policy=mp)
    fully_shard(net.vision, mp_policy=mp)
    fully_shard(net, mp_policy=mp)
    return net


def flops(c: M.VLMConfig, b: dict, train_vision: bool) -> float:
    """Model FLOPs of one micro-batch (fwd+bwd = 3x fwd for trained parts): matmuls per real token, attention per
    attended (query, key) pair, the head only at supervised positions, the frozen tower forward only."""
    q, v = c.llm, c.vision
    per_layer = q.hidden_size * (q.num_heads + 2 * q.num_kv_heads) * q.head_dim + q.num_heads * q.head_dim * \
        q.hidden_size + 3 * q.hidden_size * q.intermediate_size
    llm = 6 * q.num_layers * (per_layer * b["n_tokens"] + 2 * q.num_heads * q.head_dim * b["attn_pairs"])
    head = 6 * q.hidden_size * q.vocab_size * b["n_sup"]
    patches, blocks = (v.image_size // v.patch_size) ** 2, v.num_layers - 1
    vis = (2 + 4 * train_vision) * blocks * (v.hidden_size * (4 * v.hidden_size + 2 * v.intermediate_size) * patches +
                                             2 * v.hidden_size * patches * patches)
    proj = 6 * c.image_tokens * (v.hidden_size * q.hidden_size + q.hidden_size ** 2)
    return llm + head + (vis + proj) * b["n_images"]


def matmul_peak(device, dtype) -> float:
    """Measured dense matmul FLOP/s in `dtype`: 8192^3 on a GPU (an H200 gives ~790 of its 989 TFLOP/s spec), 2048^3
    on a CPU."""
    n, reps, sync = (8192, 20, torch.cuda.synchronize) if device.type == "cuda" else (2048, 3, lambda: None)
    a = torch.randn(n, n, dtype=dtype, device=device)
    for _ in range(3):
        a @ a
    sync()
    t = time.perf_counter()
    for _ in range(reps):
        a @ a
    sync()
    return reps * 2 * n ** 3 / (time.perf_counter() - t)


def peak_flops(cfg: Config, device, dtype) -> tuple[float, float]:
    """(spec, measured) peak FLOP/s of one device; MFU is logged against both. The spec is --peak-tflops, else the
    GPU table by full name, else (CPU, or an unknown GPU, with a warning) the measured peak."""
    measured = matmul_peak(device, dtype)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else ""
    spec = (cfg.peak_tflops or GPU_PEAK_TFLOPS.get(name, 0.0)) * 1e12
    if name and not spec:
        print0(f"warning: no spec peak for {name!r}: MFU is against the measured matmul peak (or pass --peak-tflops)")
    return spec or measured, measured


def lr_at(step: int, total: int, cfg: Config) -> float:
    """Linear warmup over the first `warmup` share of steps (the first step already moves), then cosine to 0."""
    warm = max(1, int(cfg.warmup * total))
    if step < warm:
        return cfg.lr * (step + 1) / warm
    return cfg.lr * 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, total - warm)))


# -----------------------------------------------------------------------------------------------------------------
# Checkpoints: torch.distributed.checkpoint, written to step_N.tmp and renamed when complete.


def checkpoint_dirs(out: str) -> list[str]:
    found = glob.glob(os.path.join(glob.escape(out), "checkpoints", "step_*"))
    return sorted(d for d in found if not d.endswith(".tmp") and os.path.isfile(os.path.join(d, "meta.json")))


def save_checkpoint(net, opt, out: str, step: int, meta: dict, keep: int):
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict
    path = os.path.join(out, "checkpoints", f"step_{step:07d}")
    tmp, rank = path + ".tmp", dist.get_rank()
    if rank == 0 and os.path.exists(tmp):
        shutil.rmtree(tmp)
    dist.barrier()
    msd, osd = get_state_dict(net, opt)
    dcp.save({"model": msd, "optim": osd}, checkpoint_id=tmp)
    torch.save({"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state() if torch.cuda.is_available()
               else torch.zeros(0, dtype=torch.uint8)}, os.path.join(tmp, f"rng_{rank}.pt"))
    dist.barrier()
    if rank == 0:
        M.write_json(os.path.join(tmp, "meta.json"), meta)
        if os.path.exists(path):  # this step, saved before a resume from an older checkpoint: replaced
            shutil.rmtree(path)
        os.rename(tmp, path)  # atomic: a checkpoint dir without .tmp is complete
        for old in checkpoint_dirs(out)[:-keep]:
            shutil.rmtree(old)
    dist.barrier()


def load_checkpoint(net, opt, path: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
    msd, osd = get_state_dict(net, opt)
    state = {"model": msd, "optim": osd}
    dcp.load(state, checkpoint_id=path)
    set_state_dict(net, opt, model_state_dict=state["model"], optim_state_dict=state["optim"])
    rng = torch.load(os.path.join(path, f"rng_{dist.get_rank()}.pt"), weights_only=True)
    torch.set_rng_state(rng["cpu"])
    if torch.cuda.is_available() and rng["cuda"].numel():
        torch.cuda.set_rng_state(rng["cuda"])
    with open(os.path.join(path, "meta.json")) as f:
        return json.load(f)


# -----------------------------------------------------------------------------------------------------------------
# The loop


def setup() -> tuple[int, int, torch.device]:
    """torchrun sets RANK/WORLD_SIZE; a plain `python train.py` is a world of one with an in-memory store, so both
    run the same FSDP code."""
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before NCCL starts, so that its communicator binds this rank's GPU
    one = {} if "RANK" in os.environ else dict(store=dist.HashStore(), rank=0, world_size=1)
    dist.init_process_group("nccl" if cuda else "gloo", device_id=device if cuda else None, **one)
    return dist.get_rank(), dist.get_world_size(), device


def resolve_data(cfg: Config, rank: int) -> tuple[str, str]:
    """(packed dir, tokenizer path). No --data: the toy world, generated and packed once (rank 0; others wait)."""
    if cfg.data:
        tok = cfg.tokenizer or next((os.path.join(p, "tokenizer.json") for p in (cfg.init, cfg.llm) if p and
                                     os.path.isfile(os.path.join(p, "tokenizer.json"))), "")
        if not tok and cfg.llm:
            tok = os.path.join(W.resolve(cfg.llm, ("tokenizer.json",)), "tokenizer.json")
        if not tok:  # packed rows do not name their tokenizer (stats.json has its sha256 only)
            raise SystemExit(f"{cfg.data}: no tokenizer: pass --tokenizer, the tokenizer.json the rows were packed with")
        return cfg.data, tok
    import toyworld
    if rank == 0:
        world = toyworld.ensure()
        packed = os.path.join(world, f"packed-{cfg.seq_len}-{cfg.image_tokens}")
        if not os.path.isfile(os.path.join(packed, "stats.json")):
            pack.main(["--input", os.path.join(world, "pool"), "--output", packed, "--tokenizer",
                       os.path.join(world, "tokenizer.json"), "--seq-len", str(cfg.seq_len),
                       "--image-tokens", str(cfg.image_tokens)])
    dist.barrier()
    world = toyworld.ensure()  # built by rank 0 by now
    return os.path.join(world, f"packed-{cfg.seq_len}-{cfg.image_tokens}"), cfg.tokenizer or \
        os.path.join(world, "tokenizer.json")


def dry_run(cfg: Config, vocab: int):
    c = M.preset(cfg.preset, vocab_size=vocab if cfg.preset == "tiny" else None)
    c.image_tokens = cfg.image_tokens
    with torch.device("meta"):
        net = M.VLM(c)
    vision = sum(p.numel() for p in net.vision.parameters())
    trainable = sum(p.numel() for p in net.parameters()) - vision * (not cfg.train_vision)
    doc = cfg.image_tokens + 28  # an average paper document: one image, ~28 text tokens (5B tokens / 29M pairs)
    per_row = cfg.seq_len // doc
    t = per_row * doc
    b = dict(n_tokens=t, n_images=per_row, n_sup=per_row * 27,
             attn_pairs=per_row * doc * (doc + 1) // 2 if cfg.doc_mask else t * (t + 1) // 2)
    f = flops(c, b, cfg.train_vision) / b["n_tokens"]
    hours = cfg.token_budget * f / (cfg.gpu_tflops * 1e12 * cfg.gpu_mfu) / 3600
    print(f"parameters: {trainable / 1e6:.1f}M trainable, {vision * (not cfg.train_vision) / 1e6:.1f}M frozen "
          f"(vision {vision / 1e6:.1f}M, llm {sum(p.numel() for p in net.llm.parameters()) / 1e6:.1f}M)")
    print(f"model FLOPs per token: {f / 1e9:.2f} GFLOP (rows of {per_row} docs x ({cfg.image_tokens} image + 28 "
          f"text tokens), doc mask {cfg.doc_mask})")
    print(f"projected: {cfg.token_budget / 1e9:.2f}B tokens at {cfg.gpu_tflops:.0f} TFLOP/s x {cfg.gpu_mfu:.0%} MFU = "
          f"{hours:,.0f} GPU-hours" + (" (the paper: 220 A100-40G hours for 5B tokens)" if cfg.preset == "paper"
                                        else ""))


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              timeout=10).stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def main(argv=None, config_cls=Config, presets=PRESETS, stage="pretrain", prepare=None):
    """`prepare(cfg, rank) -> (packed dir, tokenizer path)` is the stage's data step (run on every rank, before the
    model is built); pre-training's is resolve_data, sft.py's prepares its conversation rows. The loop is the same."""
    cfg = M.parse_config(config_cls, argv, presets)
    if cfg.global_batch % cfg.micro_batch:
        raise SystemExit(f"global batch {cfg.global_batch} is not a multiple of micro batch {cfg.micro_batch}")
    if cfg.compile and cfg.attention == "docs":  # each new set of document lengths is a new graph
        raise SystemExit("--attention docs recompiles under --compile at every batch: use flex (GPU) or mask")
    rank, world, device = setup()
    try:
        return run(cfg, rank, world, device, stage, prepare or resolve_data)
    finally:
        dist.destroy_process_group()


def run(cfg, rank, world, device, stage, prepare=resolve_data):
    data_dir, tok_path = prepare(cfg, rank) if not cfg.dry_run else ("", cfg.tokenizer)
    tok = M.Tokenizer(tok_path) if tok_path else None
    if cfg.dry_run:
        return dry_run(cfg, len(tok) if tok else 4096)
    if cfg.global_batch % (world * cfg.micro_batch):
        raise SystemExit(f"global batch {cfg.global_batch} must split into {world} ranks x micro batch "
                         f"{cfg.micro_batch}: lower --micro-batch")
    dtype = {"auto": torch.bfloat16 if device.type == "cuda" else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}[cfg.precision]
    done = "a finished packing has it: run python pack.py --output DIR first (or no --data: the toy world)"
    with open(os.path.join(M.need(data_dir, done, "stats.json"), "stats.json")) as f:
        stats = json.load(f)
    if (stats["seq_len"], stats["image_tokens"]) != (cfg.seq_len, cfg.image_tokens):
        raise SystemExit(f"{data_dir} was packed for seq_len {stats['seq_len']} / image_tokens "
                         f"{stats['image_tokens']}, this run uses {cfg.seq_len} / {cfg.image_tokens}")
    torch.manual_seed(cfg.seed)
    net = build_model(cfg, len(tok), device)
    mcfg, image_size = net.config, net.config.vision.image_size
    net = shard_model(net, cfg, dtype)
    params = [p for p in net.parameters() if p.requires_grad]
    groups = {}  # (vision?, decayed?) -> params; no decay on biases and <= 1-D params; --vision-lr for the tower
    for n, p in net.named_parameters():
        if p.requires_grad:
            groups.setdefault((n.startswith("vision."), p.ndim >= 2 and not n.endswith("bias")), []).append(p)
    opt = torch.optim.AdamW([{"params": ps, "weight_decay": cfg.weight_decay * decay,
                              "lr_scale": cfg.vision_lr / cfg.lr if vision and cfg.vision_lr else 1.0}
                             for (vision, decay), ps in groups.items()], lr=cfg.lr, betas=(0.9, 0.999), eps=1e-8,
                            fused=device.type == "cuda")  # one kernel for all params, not a foreach per DTensor
    rows = Rows(data_dir, cfg.seed)
    total = cfg.steps or -(-rows.total // cfg.global_batch)
    start, meta = 0, {}
    resume = checkpoint_dirs(cfg.out)[-1:] if cfg.resume == "auto" else [cfg.resume] if cfg.resume else []
    if resume:
        meta = load_checkpoint(net, opt, M.need(resume[0], "--resume is auto or OUT/checkpoints/step_N", "meta.json"))
        start = meta["step"]
        print0(f"resumed from {resume[0]} at step {start} (row {meta['rows']})")
    metrics_path = os.path.join(cfg.out, "metrics.jsonl")
    if rank == 0 and cfg.save:
        if not start and checkpoint_dirs(cfg.out):  # left there, --resume auto would mix that run's steps with ours
            print0(f"{cfg.out}: this run starts from step 0, removing the checkpoints of an earlier run")
            shutil.rmtree(os.path.join(cfg.out, "checkpoints"))
        os.makedirs(cfg.out, exist_ok=True)
        M.write_json(os.path.join(cfg.out, "config.json"), {"stage": stage, "config": dataclasses.asdict(cfg),
                                                              "model": dataclasses.asdict(mcfg), "commit": git_commit(),
                                                              "world_size": world, "data": stats})
        kept = open(metrics_path).readlines() if start and os.path.exists(metrics_path) else []
        with open(metrics_path, "w") as f:  # drop steps a killed run logged after its last checkpoint
            f.writelines(ln for ln in kept if json.loads(ln)["step"] <= start)
    wandb = None
    if cfg.wandb and rank == 0:
        try:
            import wandb
            wandb.init(project=cfg.wandb, config=dataclasses.asdict(cfg))
        except ImportError:
            print0("wandb is not installed: logging to metrics.jsonl only")
    loader = torch.utils.data.DataLoader(
        MicroBatches(rows, cfg, rank, world, start, total, image_size, tok.pad_id), batch_size=None,
        num_workers=cfg.workers, prefetch_factor=4 if cfg.workers else None, persistent_workers=False,
        pin_memory=device.type == "cuda")  # pinned, so the copies below do not wait for the GPU
    batches, accum = iter(loader), cfg.global_batch // world // cfg.micro_batch
    spec, measured = (world * p for p in peak_flops(cfg, device, dtype))
    print0(f"{stage}: {rows.total} rows, {total} steps of {cfg.global_batch} rows ({world} ranks x {accum} x "
           f"{cfg.micro_batch}), doc mask {cfg.doc_mask}, {str(dtype)[6:]}, {sum(p.numel() for p in params) / 1e6:.1f}M "
           f"trainable, peak {spec / world / 1e12:.1f} TFLOP/s spec, {measured / world / 1e12:.1f} measured")
    net.train()
    t_start, history = time.time(), []
    for step in range(start, total):
        t0 = time.perf_counter()
        micro = [next(batches) for _ in range(accum)]
        t_data = time.perf_counter() - t0
        counts = [sum(b[k] for b in micro) for k in ("n_sup", "n_tokens", "n_images", "bad_images", "bad_docs")]
        counts = torch.tensor(counts + [sum(flops(mcfg, b, cfg.train_vision) for b in micro)], dtype=torch.float64,
                              device=device)
        dist.all_reduce(counts)  # with the .tolist(): one host sync per step, while the GPU is idle between steps
        n_sup, n_tokens, n_images, bad, bad_docs, f = counts.tolist()
        where = f"step {step} (rows from {step * cfg.global_batch}, first micro-batch at {micro[0]['rows'][0]})"
        if n_sup == 0:
            raise RuntimeError(f"{where}: no supervised tokens in the whole step")
        loss_sum = torch.zeros((), device=device)
        for j, b in enumerate(micro):
            net.set_requires_gradient_sync(j == accum - 1)  # reduce-scatter once per step, not per micro-batch
            px = M.normalize_pixels(M.to_device(b["pixels"], device), dtype) if b["n_images"] else None
            loss = net(M.to_device(b["input_ids"], device), px, b["doc_lens"], M.to_device(b["targets"], device),
                       doc_mask=cfg.doc_mask, backend=cfg.attention)
            # Sum of token losses over the global count of supervised tokens; FSDP averages gradients over ranks,
            # so multiply by the world size to get the true global mean (not a mean of per-micro-batch means).
            (loss * world / n_sup).backward()
            loss_sum += loss.detach()
        gnorm = torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        gnorm = gnorm.full_tensor() if hasattr(gnorm, "full_tensor") else gnorm
        dist.all_reduce(loss_sum)
        loss_val, gnorm_val = loss_sum.item() / n_sup, gnorm.item()
        if not (math.isfinite(loss_val) and math.isfinite(gnorm_val)):
            raise RuntimeError(f"{where}: non-finite loss {loss_val} or grad norm {gnorm_val}")
        lr = lr_at(step, total, cfg)
        for g in opt.param_groups:
            g["lr"] = lr * g["lr_scale"]
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.synchronize()  # the step's time includes the optimizer's kernels
        dt = time.perf_counter() - t0
        history.append({"step": step + 1, "loss": loss_val, "lr": lr, "grad_norm": gnorm_val, "tokens": int(n_tokens),
                        "supervised": int(n_sup), "images": int(n_images), "bad_images": int(bad),
                        "bad_docs": int(bad_docs), "time": dt, "data_wait": t_data / dt, "mfu": f / dt / spec,
                        "mfu_measured": f / dt / measured})
        if rank == 0 and cfg.save:
            with open(metrics_path, "a") as fh:
                fh.write(json.dumps(history[-1]) + "\n")
        if wandb:
            wandb.log(history[-1], step=step + 1)
        if (step + 1) % cfg.log_every == 0 or step + 1 == total or step == start:
            log_line(history[-cfg.log_every:], step + 1, total, start, t_start, device)  # the last log_every steps
        if cfg.save and ((cfg.ckpt_every and (step + 1) % cfg.ckpt_every == 0) or step + 1 == total):
            save_checkpoint(net, opt, cfg.out, step + 1, {"step": step + 1, "rows": (step + 1) * cfg.global_batch,
                                                          "config": dataclasses.asdict(cfg), "commit": git_commit()},
                            cfg.keep)
    if cfg.save:
        save_final(net, mcfg, cfg, tok_path, stage)
    return history


def log_line(window, step, total, start, t_start, device):
    t = sum(r["time"] for r in window)
    done = (step - start) / max(1, total - start)
    eta = (time.time() - t_start) * (1 - done) / max(done, 1e-9)
    mem = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else \
        resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # peak RSS (KiB on Linux)
    bar = "#" * int(20 * step / total)
    print0(f"[{bar:<20}] step {step}/{total} loss {window[-1]['loss']:.4f} lr {window[-1]['lr']:.2e} "
           f"gnorm {window[-1]['grad_norm']:.2f} | {sum(r['tokens'] for r in window) / t:,.0f} tok/s "
           f"{sum(r['images'] for r in window) / t:,.1f} img/s mfu {np.mean([r['mfu'] for r in window]):.1%} "
           f"({np.mean([r['mfu_measured'] for r in window]):.1%} of measured) mem {mem:.1f}G "
           f"data {np.mean([r['data_wait'] for r in window]):.0%} | eta {eta / 60:.1f}m")


def save_final(net, mcfg: M.VLMConfig, cfg: Config, tok_path: str, stage: str = "pretrain"):
    """The plain VLM (model.py's safetensors format) that sft.py and eval.py load, with its tokenizer; its
    config.json also records the stage and what cfg.final_meta() adds (loaders read only the model's fields)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    state = get_model_state_dict(net, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if dist.get_rank() == 0:
        final = os.path.join(cfg.out, "final")
        M.save_vlm(final, mcfg, {k: v.float() if v.is_floating_point() else v for k, v in state.items()})
        with open(path := os.path.join(final, "config.json")) as f:
            saved = json.load(f)
        M.write_json(path, {**saved, "stage": stage, **cfg.final_meta()})
        shutil.copyfile(tok_path, tmp := os.path.join(final, ".tokenizer.json.tmp"))
        os.replace(tmp, os.path.join(final, "tokenizer.json"))  # last, atomically: speedrun.sh's "final is complete"
        print0(f"saved {final}")
    dist.barrier()


if __name__ == "__main__":
    main()
