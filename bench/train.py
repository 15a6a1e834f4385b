"""
Training-step throughput: our VLM step vs. the same step built from transformers' Qwen2ForCausalLM and
SiglipVisionModel (hidden_states[-2], our projector, masked_scatter splice), on the same packed rows with plain
causal attention for both (no doc mask). Also our MFU against a matmul peak measured in this run. CPU, one process.

    python bench/train.py [--dtype bf16] [--repeats 5]
"""
import os
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import model as M  # noqa: E402
import train  # noqa: E402


@dataclass
class Config:
    dtype: str = "fp32"  # fp32 | bf16
    repeats: int = 5
    rows: int = 2  # packed rows per step
    seq_len: int = 1024
    image_tokens: int = 64  # 16x16 grid pooled to 8x8
    vocabs: str = "16384,151936"  # a small vocab, and Qwen2.5's real one (where skipping unsupervised logits pays most)
    threads: int = 0  # 0 = torch's default


def packed_rows(cfg, vocab, rng):
    """Caption documents like pre-training: <s> [image] \\n ~8-40 text tokens <|im_end|>, packed to seq_len."""
    rows = []
    for _ in range(cfg.rows):
        ids, lens = [], []
        while True:
            doc = [1, M.IMAGE_ID] + rng.integers(3, vocab, int(rng.integers(8, 40))).tolist() + [2]
            if len(ids) + len(doc) + (cfg.image_tokens - 1) * (ids.count(M.IMAGE_ID) + 1) > cfg.seq_len:
                break
            ids, lens = ids + doc, lens + [len(doc)]
        rows.append({"input_ids": ids, "doc_lengths": lens})
    return rows


def main():
    cfg = M.parse_config(Config)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    for vocab in map(int, cfg.vocabs.split(",")):
        bench(cfg, vocab)


def bench(cfg, vocab):
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[cfg.dtype]
    import transformers
    torch.manual_seed(0)
    vc = M.VisionConfig(224, 14, 384, 1536, 12, 6, act="gelu_tanh", use_head=False)  # 16x16 patches
    qc = M.QwenConfig(vocab, 512, 1408, 8, 8, 2, 64, 1e4, tie_embeddings=True)
    ours = M.VLM(M.VLMConfig(vc, qc, cfg.image_tokens)).init_weights(0)
    hf_llm = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
        vocab_size=vocab, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
        num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=True, attn_implementation="sdpa"))
    hf_vis = transformers.SiglipVisionModel(transformers.SiglipVisionConfig(
        image_size=224, patch_size=14, hidden_size=384, intermediate_size=1536, num_hidden_layers=12,
        num_attention_heads=6, vision_use_head=False, attn_implementation="sdpa"))
    hf_proj = M.Projector(384, 512, 16, cfg.image_tokens)
    hf_proj.load_state_dict(ours.projector.state_dict())
    for m in (ours, hf_llm, hf_vis, hf_proj):
        m.to(dtype).train()
    ours.vision.requires_grad_(False)
    hf_vis.requires_grad_(False)

    rng = np.random.default_rng(0)
    batch = M.collate_rows(packed_rows(cfg, vocab, rng), cfg.image_tokens, cfg.seq_len, pad_id=0)
    n_images = int((batch["input_ids"] == M.IMAGE_ID).sum()) // cfg.image_tokens
    pixels = torch.randn(n_images, 3, 224, 224, dtype=dtype)
    ids, targets = batch["input_ids"], batch["targets"]
    n_sup = int((targets != M.IGNORE).sum())
    labels = torch.cat([torch.full_like(targets[:, :1], M.IGNORE), targets[:, :-1]], 1)  # HF shifts internally
    opt_ours = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-4)
    opt_hf = torch.optim.AdamW(list(hf_llm.parameters()) + list(hf_proj.parameters()), lr=1e-4)

    def step_ours():
        loss = ours(ids, pixels, batch["doc_lens"], targets, doc_mask=False) / n_sup
        loss.backward()
        opt_ours.step()
        opt_ours.zero_grad(set_to_none=True)

    def step_hf():
        with torch.no_grad():
            feats = hf_vis(pixel_values=pixels, output_hidden_states=True).hidden_states[-2]
        x = hf_llm.model.embed_tokens(ids.clamp(min=0))
        x = x.masked_scatter((ids == M.IMAGE_ID)[..., None], hf_proj(feats).to(x.dtype))
        hf_llm(inputs_embeds=x, labels=labels).loss.backward()
        opt_hf.step()
        opt_hf.zero_grad(set_to_none=True)

    tokens = cfg.rows * cfg.seq_len
    times = {"ours": [], "transformers": []}
    for fn in (step_ours, step_hf):  # warm-up
        fn()
    for _ in range(cfg.repeats):  # interleaved, so machine noise hits both sides alike
        for name, fn in (("ours", step_ours), ("transformers", step_hf)):
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    med = {k: float(np.median(v)) for k, v in times.items()}
    b = {"n_tokens": tokens, "attn_pairs": cfg.rows * cfg.seq_len * (cfg.seq_len + 1) // 2, "n_sup": n_sup,
         "n_images": n_images}
    model_flops = train.flops(ours.config, b, train_vision=False)
    peak = train.matmul_peak(torch.device("cpu"), dtype)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {cfg.dtype}; {cfg.rows} rows x "
          f"{cfg.seq_len} tokens, {n_images} images x {cfg.image_tokens} tokens, {n_sup} supervised tokens")
    print(f"vision 12 blocks x 384 (16x16 patches), llm 8 layers x 512, vocab {vocab}; "
          f"measured matmul peak {peak / 1e9:.0f} GFLOP/s")
    for k in med:
        print(f"{k:>13}: {med[k] * 1e3:8.1f} ms/step  {tokens / med[k]:8,.0f} tok/s")
    print(f"speed-up (ours / transformers): {med['transformers'] / med['ours']:.2f}x")
    print(f"our MFU: {model_flops / med['ours'] / peak:.1%} of the measured {cfg.dtype} matmul peak")


if __name__ == "__main__":
    main()
