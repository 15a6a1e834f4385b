"""
Checkpoint formats in and out, for model.py's modules: transformers' Qwen2 and SigLIP safetensors (single or
sharded), timm/open_clip SigLIP, the official Open-Qwen2VL `latest-checkpoint.pt`, and the one entry point the stages
load models through, `load_vlm`. model.py is the ground floor; this file builds on it and no module of model.py
imports it at load time (the `from_pretrained` classmethods import it inside the call).

Spec: ../shared/design/formats.md §3-4 (released layouts), reference.md §8.10 (the official checkpoint).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re

import torch
import torch.nn as nn

import model as M
from model import VLM, Qwen2, QwenConfig, Siglip, SiglipVision, TextConfig, VisionConfig, VLMConfig

# -----------------------------------------------------------------------------------------------------------------
# transformers' config.json -> our configs. A key missing from the file (hub configs omit defaults) has HF's default.


def _act(name: str) -> str:
    table = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh", "gelu_tanh": "gelu_tanh", "gelu": "gelu"}
    if name not in table:
        raise ValueError(f"unsupported activation {name!r}")
    return table[name]


def _siglip_fields(d: dict) -> dict:
    """Fields both SigLIP towers have."""
    return dict(hidden_size=d.get("hidden_size", 768), intermediate_size=d.get("intermediate_size", 3072),
                num_layers=d.get("num_hidden_layers", 12), num_heads=d.get("num_attention_heads", 12),
                eps=d.get("layer_norm_eps", 1e-6), act=_act(d.get("hidden_act", "gelu_pytorch_tanh")))


def vision_config(d: dict) -> VisionConfig:
    return VisionConfig(d.get("image_size", 224), d.get("patch_size", 16), use_head=d.get("vision_use_head", True),
                        **_siglip_fields(d))


def text_config(d: dict) -> TextConfig:
    shared = _siglip_fields(d)
    return TextConfig(d.get("vocab_size", 32000), max_positions=d.get("max_position_embeddings", 64),
                      projection_size=d.get("projection_size") or shared["hidden_size"], **shared)


def qwen_config(d: dict) -> QwenConfig:
    h, nh = d["hidden_size"], d["num_attention_heads"]
    theta = (d.get("rope_parameters") or {}).get("rope_theta", d.get("rope_theta", 10000.0))  # v5 / v4 layouts
    if (d.get("rope_parameters") or d.get("rope_scaling") or {}).get("rope_type", "default") != "default":
        raise ValueError("only the default RoPE is implemented (Qwen2.5 uses it)")
    return QwenConfig(d["vocab_size"], h, d["intermediate_size"], d["num_hidden_layers"], nh,
                      d.get("num_key_value_heads", nh), d.get("head_dim") or h // nh, float(theta),
                      d.get("rms_norm_eps", 1e-6), d.get("tie_word_embeddings", False))


# -----------------------------------------------------------------------------------------------------------------
# Loading. A model is built on the meta device and each checkpoint tensor is converted and placed as it is read, so
# a 1.5B model never exists twice in memory and can go straight to bf16. Key maps are explicit regex tables:
# (checkpoint name, our name[, parts]); the tensors of a parts group are concatenated (we fuse q/k/v, gate/up).

SKIP = "skip"
_L = r"(?:encoder\.layers|blocks)\.(\d+)\."  # one pattern for both HF and timm block prefixes
QWEN_KEYS = [  # HF Qwen2ForCausalLM, with or without the leading "model."
    (r"embed_tokens\.weight", "embed_tokens.weight"), (r"norm\.weight", "norm.weight"),
    (r"lm_head\.weight", "lm_head.weight"), (r".*rotary_emb\.inv_freq", SKIP),
    (r"layers\.(\d+)\.self_attn\.(?P<part>[qkv])_proj\.(weight|bias)", r"layers.\1.qkv.\3", "qkv"),
    (r"layers\.(\d+)\.mlp\.(?P<part>gate|up)_proj\.weight", r"layers.\1.gate_up.weight", ("gate", "up")),
    (r"layers\.(\d+)\.self_attn\.o_proj\.weight", r"layers.\1.o_proj.weight"),
    (r"layers\.(\d+)\.mlp\.down_proj\.weight", r"layers.\1.down.weight"),
    (r"layers\.(\d+)\.input_layernorm\.weight", r"layers.\1.attn_norm.weight"),
    (r"layers\.(\d+)\.post_attention_layernorm\.weight", r"layers.\1.mlp_norm.weight"),
]
SIGLIP_BLOCK_KEYS = [  # HF encoder.layers.N.* and timm blocks.N.*
    (_L + r"(?:layer_norm|norm)([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (_L + r"self_attn\.(?P<part>[qkv])_proj\.(weight|bias)", r"blocks.\1.qkv.\3", "qkv"),
    (_L + r"attn\.qkv\.(weight|bias)", r"blocks.\1.qkv.\2"),
    (_L + r"(?:self_attn\.out_proj|attn\.proj)\.(weight|bias)", r"blocks.\1.proj.\2"),
    (_L + r"mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.\2.\3"),
    (r"embeddings\.position_ids", SKIP),
]
VISION_KEYS = SIGLIP_BLOCK_KEYS + [
    (r"embeddings\.patch_embedding\.(weight|bias)|patch_embed\.proj\.(weight|bias)", r"patch_embed.\1\2"),
    (r"embeddings\.position_embedding\.weight|pos_embed", "pos_embed"),
    (r"post_layernorm\.(weight|bias)|norm\.(weight|bias)", r"post_norm.\1\2"),
    (r"head\.probe|attn_pool\.latent", "head.probe"),
    (r"head\.attention\.in_proj_(weight|bias)", r"head.in_proj.\1"),
    (r"attn_pool\.(?P<part>q|kv)\.(weight|bias)", r"head.in_proj.\2", ("q", "kv")),  # timm splits q from kv
    (r"head\.attention\.out_proj\.(weight|bias)|attn_pool\.proj\.(weight|bias)", r"head.out_proj.\1\2"),
    (r"head\.layernorm\.(weight|bias)|attn_pool\.norm\.(weight|bias)", r"head.norm.\1\2"),
    (r"(?:head|attn_pool)\.mlp\.(fc[12])\.(weight|bias)", r"head.\1.\2"),
]
TEXT_KEYS = SIGLIP_BLOCK_KEYS + [
    (r"embeddings\.token_embedding\.weight", "token_embed.weight"),
    (r"embeddings\.position_embedding\.weight", "pos_embed"),
    (r"final_layer_norm\.(weight|bias)", r"final_norm.\1"), (r"head\.(weight|bias)", r"head.\1"),
]


def _mapper(*tables):
    """(checkpoint prefix, rules, our prefix) tables -> name -> (our name, part, parts) | SKIP | None (unknown).
    A rule with a part list fuses tensors: the `part` group says which slice of our tensor this one is."""
    compiled = [(pre, re.compile(r[0]), r[1], r[2] if len(r) > 2 else None, ours)
                for pre, rules, ours in tables for r in rules]

    def key_map(name):
        for pre, rx, repl, parts, ours in compiled:
            if name.startswith(pre) and (m := rx.fullmatch(name[len(pre):])):
                if repl == SKIP:
                    return SKIP
                return ours + m.expand(repl), *((list(parts).index(m["part"]), len(parts)) if parts else (0, 1))
        return None
    return key_map


def resolve(src: str, patterns=("config.json", "*.safetensors", "*.safetensors.index.json")) -> str:
    """A local directory or file, or a hub id fetched with snapshot_download (only the files we read)."""
    if os.path.exists(src):
        return src
    if src.count("/") != 1 or src.startswith((".", "/")):
        raise FileNotFoundError(f"{src}: no such file or directory")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(src, allow_patterns=list(patterns))
    except Exception as e:
        raise FileNotFoundError(f"{src}: not a local path, and the hub could not provide it ({e})") from None


def read_config(d: str) -> dict:
    path = os.path.join(d, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{d}: no config.json")
    with open(path) as f:
        return json.load(f)


def read_tensors(d: str):
    """(file, name, tensor) for every tensor of a safetensors file or a checkpoint directory (sharded or not), read
    lazily: safetensors mmaps."""
    from safetensors import safe_open
    if os.path.isfile(d):
        files = [d]
    elif os.path.isfile(index := os.path.join(d, "model.safetensors.index.json")):
        with open(index) as f:
            files = sorted({os.path.join(d, v) for v in json.load(f)["weight_map"].values()})
    elif not (files := sorted(os.path.join(d, f) for f in os.listdir(d) if f.endswith(".safetensors"))):
        raise FileNotFoundError(f"{d}: no model.safetensors or model.safetensors.index.json")
    for path in files:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path}: weight file missing")
        try:
            with safe_open(path, "pt") as f:
                names = list(f.keys())
                for name in names:
                    yield path, name, f.get_tensor(name)
        except Exception as e:  # safetensors' own error type; our consumers' errors never pass through here
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from None


def load_into(model: nn.Module, tensors, key_map, dtype=None) -> nn.Module:
    """Fill `model` (on the meta device) from (file, name, tensor) triples. Every checkpoint tensor must map to a
    parameter with the right shape, and every parameter must be filled: anything else is an error naming it."""
    params = dict(model.named_parameters())
    parts: dict[str, dict] = {}
    seen = set()
    for path, name, t in tensors:
        seen.add(path)
        m = key_map(name)
        if m == SKIP:
            continue
        if m is None or m[0] not in params:
            raise KeyError(f"{path}: unexpected tensor {name!r}" + (f" (-> {m[0]!r})" if m else ""))
        ours, part, n = m
        t = t.to(dtype or params[ours].dtype)
        if n > 1:
            parts.setdefault(ours, {})[part] = (t, name)
            if len(parts[ours]) < n:
                continue
            got = parts.pop(ours)
            name = "+".join(got[i][1] for i in range(n))
            t = torch.cat([got[i][0] for i in range(n)])
        want = params[ours].shape
        if t.shape != want and t.shape[0] == 1 and t.shape[1:] == want:  # timm keeps a batch dim on pos_embed
            t = t[0]
        if t.shape != want:
            raise ValueError(f"{path}: tensor {name!r} has shape {tuple(t.shape)}, expected {tuple(want)} for {ours}")
        mod, _, leaf = ours.rpartition(".")
        params[ours] = nn.Parameter(t, requires_grad=params[ours].requires_grad)
        setattr(model.get_submodule(mod), leaf, params[ours])
    missing = [k for k, p in model.named_parameters() if p.is_meta] + [k + " (partial)" for k in parts]
    if missing:
        raise KeyError(f"{', '.join(sorted(seen))}: missing {len(missing)} tensor(s): {', '.join(missing[:8])}")
    return model


def load_qwen(src: str, dtype=None) -> Qwen2:
    d = resolve(src)
    cfg = qwen_config(read_config(d))
    with torch.device("meta"):
        model = Qwen2(cfg)
    rules = ([(r"lm_head\.weight", SKIP)] if cfg.tie_embeddings else []) + QWEN_KEYS  # tied: the head is the embedding
    return load_into(model, read_tensors(d), _mapper(("model.", rules, ""), ("", rules, "")), dtype)


def load_vision(src: str, config: VisionConfig | None = None, act: str | None = None, dtype=None) -> SiglipVision:
    """HF SigLIP (full model or vision-only) or timm/open_clip layouts (`visual.trunk.` prefix optional). `act`
    overrides the activation: timm runs exact GELU where HF configs say gelu_pytorch_tanh (§1.1)."""
    d = resolve(src, ("config.json", "*.safetensors", "*.safetensors.index.json", "open_clip_config.json"))
    if config is None:
        if not os.path.isfile(os.path.join(d, "config.json")):
            raise ValueError(f"{src}: no config.json (a timm checkpoint?): pass config=, e.g. preset('paper').vision")
        c = read_config(d)
        config = vision_config(c.get("vision_config", c))
    if act is not None:
        config = dataclasses.replace(config, act=_act(act))
    with torch.device("meta"):
        model = SiglipVision(config)
    skip = [(r"text_model\..*|text\..*|logit_(scale|bias)", SKIP)]
    if not config.use_head:
        skip.append((r"(?:vision_model\.|visual\.trunk\.)?(?:head|attn_pool)\..*", SKIP))
    key_map = _mapper(("", skip, ""), ("vision_model.", VISION_KEYS, ""), ("visual.trunk.", VISION_KEYS, ""),
                      ("", VISION_KEYS, ""))
    return load_into(model, read_tensors(d), key_map, dtype)


def load_siglip(src: str, dtype=None) -> Siglip:
    d = resolve(src)
    c = read_config(d)
    with torch.device("meta"):
        model = Siglip(vision_config(c["vision_config"]), text_config(c["text_config"]))
    key_map = _mapper(("vision_model.", VISION_KEYS, "vision."), ("text_model.", TEXT_KEYS, "text."),
                      ("", [(r"logit_(scale|bias)", r"logit_\1")], ""))
    return load_into(model, read_tensors(d), key_map, dtype)


def build_vlm(vision: str, llm: str, image_tokens: int = 144, act: str | None = None, dtype=None) -> VLM:
    """The pre-training start (§3.1): pretrained SigLIP and Qwen2 (local dirs or hub ids), a fresh projector."""
    v, q = load_vision(vision, act=act, dtype=dtype), load_qwen(llm, dtype=dtype)
    with torch.device("meta"):
        model = VLM(VLMConfig(v.config, q.config, image_tokens))
    model.vision, model.llm = v, q
    model.projector.to_empty(device="cpu").init_weights()  # fp32 like a fresh module, then the model's dtype
    return model.to(dtype) if dtype else model


def load_official(ckpt: str, vision: str, llm: str, image_tokens: int = 144, dtype=None) -> VLM:
    """The official `latest-checkpoint.pt`: {"model": {"projector": {mlp_projector.0/2.*}, "llm_backbone": {llm.*}}}
    in fp32 (§8.10). It has no vision weights (they come from `vision`, timm or HF SigLIP) and no LLM config (read
    from `llm`'s config.json). Loaded with weights_only=True: no code in a checkpoint ever runs."""
    sd = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["model"]
    c = qwen_config(read_config(resolve(llm, ("config.json",))))
    v = load_vision(vision, dtype=dtype)
    with torch.device("meta"):
        model = VLM(VLMConfig(v.config, c, image_tokens))
    model.vision = v
    llm_rules = ([(r"lm_head\.weight", SKIP)] if c.tie_embeddings else []) + QWEN_KEYS  # a tied head is stored twice
    proj_rules = [(r"0\.(weight|bias)", r"fc1.\1"), (r"2\.(weight|bias)", r"fc2.\1")]  # Sequential(fc1, GELU, fc2)
    key_map = _mapper(("mlp_projector.", proj_rules, "projector."), ("llm.model.", llm_rules, "llm."),
                      ("llm.", llm_rules, "llm."))
    tensors = [(ckpt, k, t) for part in ("projector", "llm_backbone") for k, t in sd[part].items()]
    return load_into(model, tensors, key_map, dtype)


# -----------------------------------------------------------------------------------------------------------------
# The one loader the stages use.


def load_vlm(src: str, vision: str | None = None, llm: str | None = None, dtype=None,
             image_tokens: int | None = None) -> VLM:
    """Any VLM checkpoint, recognised by its files: our own (model.save_vlm). The returned model's `tokenizer_path`
    is the tokenizer.json that goes with it (None if the checkpoint ships none)."""
    d = resolve(src, ("config.json", "*.safetensors", "*.safetensors.index.json", "tokenizer.json"))
    model = M.load_vlm(d, dtype=dtype, image_tokens=image_tokens)
    tok = os.path.join(d, "tokenizer.json")
    model.tokenizer_path = tok if os.path.isfile(tok) else None
    return model
