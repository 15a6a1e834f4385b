"""
Checkpoint formats in: HF Qwen2 and SigLIP, timm SigLIP, and (`load_vlm`, the stages' one loader) ours, the released
Open-Qwen2VL, the MLM-Filter judge, transformers' LLaVA. Out: `python weights.py export-hf SRC OUT`, transformers'
LLaVA. Builds on model.py, which imports it only inside calls. Spec: ../shared/design/formats.md §3-4, reference.md.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import sys
from dataclasses import dataclass

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


def _siglip_fields(d: dict) -> dict:  # both SigLIP towers have them
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
    (r"head\.attention\.in_proj_(weight|bias)", r"head.qkv.\1"),
    (r"attn_pool\.(?P<part>q|kv)\.(weight|bias)", r"head.qkv.\2", ("q", "kv")),  # timm splits q from kv
    (r"head\.attention\.out_proj\.(weight|bias)|attn_pool\.proj\.(weight|bias)", r"head.proj.\1\2"),
    (r"head\.layernorm\.(weight|bias)|attn_pool\.norm\.(weight|bias)", r"head.norm2.\1\2"),
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
    if not os.path.isfile(path := os.path.join(d, "config.json")):
        raise FileNotFoundError(f"{d}: no config.json")
    with open(path) as f:
        return json.load(f)


def read_tensors(d: str, names_only: bool = False):
    """(file, name, tensor) for every tensor of a safetensors file or a checkpoint directory (sharded or not), read
    lazily: safetensors mmaps. names_only: (file, name, None), reading only the headers."""
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
                    yield path, name, None if names_only else f.get_tensor(name)
        except Exception as e:  # safetensors' own error type; our consumers' errors never pass through here
            raise ValueError(f"{path}: unreadable safetensors file ({e})") from None


def load_into(model: nn.Module, tensors, key_map, dtype=None) -> nn.Module:
    """Fill `model` (on the meta device) from (file, name, tensor) triples. Every checkpoint tensor must map to a
    parameter with the right shape, and every parameter must be filled: anything else is an error naming it."""
    params = dict(model.named_parameters())
    parts, seen = {}, set()  # parts: our fused name -> the pieces read so far
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


def _llm_rules(c: QwenConfig) -> list:  # a tied head is the embedding: a stored lm_head (the official .pt) is skipped
    return ([(r"lm_head\.weight", SKIP)] if c.tie_embeddings else []) + QWEN_KEYS


def _vision_tables(prefixes, ours: str, use_head: bool) -> list:  # a SigLIP vision tower under any of `prefixes`
    skip = [(r"text_model\..*|text\..*|logit_(scale|bias)" + ("" if use_head else r"|(?:head|attn_pool)\..*"), SKIP)]
    return [(pre, rules, ours) for pre in prefixes for rules in (skip, VISION_KEYS)]


def load_qwen(src: str, dtype=None) -> Qwen2:
    cfg = qwen_config(read_config(d := resolve(src)))
    with torch.device("meta"):
        model = Qwen2(cfg)
    return load_into(model, read_tensors(d), _mapper(("model.", _llm_rules(cfg), ""), ("", _llm_rules(cfg), "")), dtype)


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
    key_map = _mapper(*_vision_tables(("vision_model.", "visual.trunk.", ""), "", config.use_head))
    return load_into(model, read_tensors(d), key_map, dtype)


def load_siglip(src: str, dtype=None) -> Siglip:
    c = read_config(d := resolve(src))
    with torch.device("meta"):
        model = Siglip(vision_config(c["vision_config"]), text_config(c["text_config"]))
    key_map = _mapper(("vision_model.", VISION_KEYS, "vision."), ("text_model.", TEXT_KEYS, "text."),
                      ("", [(r"logit_(scale|bias)", r"logit_\1")], ""))
    return load_into(model, read_tensors(d), key_map, dtype)


def build_vlm(vision: str, llm: str, image_tokens: int = 144, act: str | None = None, dtype=None) -> VLM:
    """The pre-training start (§3.1): pretrained SigLIP and Qwen2 (local dirs or hub ids), a fresh projector."""
    v, q = load_vision(vision, act=act, dtype=dtype), load_qwen(llm, dtype=dtype)
    v.config.use_head, v.head = False, None  # the VLM never uses SigLIP's pooling head
    with torch.device("meta"):
        model = VLM(VLMConfig(v.config, q.config, image_tokens))
    model.vision, model.llm = v, q
    model.projector.to_empty(device="cpu").init_weights()  # fp32 like a fresh module, then the model's dtype
    return model.to(dtype) if dtype else model


PROJ_KEYS = [(r"(?:mlp_projector\.0|linear_1)\.(weight|bias)", r"fc1.\1"),  # official Sequential(fc1, GELU, fc2)
             (r"(?:mlp_projector\.2|linear_2)\.(weight|bias)", r"fc2.\1")]  # transformers' LlavaMultiModalProjector


def load_official(ckpt: str, vision: str, llm: str, image_tokens: int = 144, dtype=None, act: str | None = None) -> VLM:
    """The official .pt, {"model": {"projector", "llm_backbone"}} (§8.10), vision from `vision`; weights_only."""
    try:
        sd = torch.load(ckpt, map_location="cpu", weights_only=True, mmap=True)["model"]
        tensors = [(ckpt, k, t) for part in ("projector", "llm_backbone") for k, t in sd[part].items()]
    except Exception as e:  # truncated, not a checkpoint, or a pickle that needs more than tensors to load
        raise ValueError(f"{ckpt}: not a loadable Open-Qwen2VL checkpoint ({type(e).__name__}: {e})") from None
    c = qwen_config(read_config(resolve(llm, ("config.json",))))
    v = load_vision(vision, act=act, dtype=dtype)
    v.config.use_head, v.head = False, None  # the VLM never uses SigLIP's pooling head
    with torch.device("meta"):
        model = VLM(VLMConfig(v.config, c, image_tokens))
    model.vision = v
    key_map = _mapper(("", PROJ_KEYS, "projector."), *[(p, _llm_rules(c), "llm.") for p in ("llm.model.", "llm.")])
    return load_into(model, tensors, key_map, dtype)


# -----------------------------------------------------------------------------------------------------------------
# The one loader the stages use: every VLM layout, recognised by its config.json (formats.md §3-4).

REGISTRY = {"siglip-vit-so400m-384px": ("google/siglip-so400m-patch14-384", "gelu"),  # backbone id -> (hub id,
            "qwen2.5-1.5b-instruct": ("Qwen/Qwen2.5-1.5B-Instruct", None)}  # the activation it ran: timm's is exact)


def _tokenizer(d: str | None) -> str | None:
    return os.path.join(d, "tokenizer.json") if d and os.path.isfile(os.path.join(d, "tokenizer.json")) else None


def _load_prismatic(d, c, vision, llm, dtype, image_tokens):
    """A released Open-Qwen2VL run dir: backbones named by registry id, weights in checkpoints/latest-checkpoint.pt."""
    m, cfg = c["model"], os.path.join(d, "config.json")
    for key, override in (("vision_backbone_id", vision), ("llm_backbone_id", llm)):
        if override is None and m[key] not in REGISTRY:
            raise ValueError(f"{cfg}: unknown {key} {m[key]!r} (known: {', '.join(REGISTRY)}); pass vision=/llm=")
    arch = re.fullmatch(r"(?:[\w-]+\+)?(?:(\d+)-)?avgpool", m["arch_specifier"])  # no-align+avgpool: 144 tokens
    if arch is None or m.get("image_resize_strategy", "resize-naive") != "resize-naive":
        raise ValueError(f"{cfg}: unsupported arch_specifier {m['arch_specifier']!r} or image_resize_strategy "
                         f"{m.get('image_resize_strategy')!r} (avgpool projectors and resize-naive are implemented)")
    v_hub, act = REGISTRY.get(m["vision_backbone_id"], (None, None))
    llm_dir = resolve(llm or REGISTRY[m["llm_backbone_id"]][0], ("*.json", "*.safetensors"))
    model = load_official(os.path.join(d, "checkpoints", "latest-checkpoint.pt"), vision or v_hub, llm_dir,
                          image_tokens or int(arch[1] or 144), dtype, act)
    return model, _tokenizer(llm_dir), "release"  # the chat format the released checkpoints most likely saw (§1.8)


def _load_llava(d, c, vision, llm, dtype, image_tokens):
    """transformers' LLaVA (a SigLIP tower, Qwen2, Linear-GELU-Linear on every patch: our export; v4 or v5 names),
    or the MLM-Filter judge (llava_qwen, §3.2: Qwen2 at `model.*`, the pooling MLP at `model.mm_projector.*`, block
    `mm_vision_select_layer` of an HF SigLIP, tanh GELU, weights in the checkpoint or at `mm_vision_tower`)."""
    judge = c["model_type"] == "llava_qwen"
    cc = {"projector_hidden_act": "gelu", "multimodal_projector_bias": True, "vision_feature_layer": -2, **c}
    want = {"mm_projector_type": "aapool_mlp"} if judge else {  # MLM-Filter's avg pooling + MLP; or what we export
        "vision_config": "siglip_vision_model", "text_config": "qwen2", "projector_hidden_act": "gelu",
        "vision_feature_select_strategy": "full", "multimodal_projector_bias": True}
    found = {k: (cc.get(k) or {}).get("model_type") if k.endswith("_config") else cc.get(k) for k in want}
    if found != want or not isinstance(cc["vision_feature_layer"], int):
        raise ValueError(f"{d}/config.json: a LLaVA variant this does not implement: found {found}, vision_feature_"
                         f"layer {cc['vision_feature_layer']!r}; implemented: {want}, one int feature layer")
    if judge:
        v = read_config(resolve(v_src := vision or c["mm_vision_tower"], ("config.json",)))
        v, t, tokens, layer = v.get("vision_config", v), c, c.get("mm_num_image_tokens", 144), c.get(
            "mm_vision_select_layer", -1)  # LLaVA's defaults
    else:
        v, t, tokens, layer = c["vision_config"], c["text_config"], None, cc["vision_feature_layer"]
    vc = dataclasses.replace(vision_config(v), use_head=False)
    cfg = VLMConfig(vc, qwen_config(t), image_tokens or tokens or (vc.image_size // vc.patch_size) ** 2, layer)
    with torch.device("meta"):
        model = VLM(cfg)
    towers = ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower.vision_model.",
              "model.vision_tower.", "vision_tower.vision_model.", "vision_tower.")
    if judge and not any(n.startswith(towers[0]) for _, n, _ in read_tensors(d, names_only=True)):
        model.vision = load_vision(v_src, config=vc, dtype=dtype)
    rules = _llm_rules(cfg.llm)
    key_map = _mapper(*[(p, PROJ_KEYS, "projector.") for p in ("model.mm_projector.", "model.multi_modal_projector.",
                                                              "multi_modal_projector.")],
                      *_vision_tables(towers, "vision.", False), *[(p, rules, "llm.") for p in (
                          "model.language_model.", "language_model.model.", "language_model.", "model.", "")])
    tok = _tokenizer(d) or _tokenizer(resolve(llm or REGISTRY["qwen2.5-1.5b-instruct"][0], ("tokenizer.json",)))
    style = c.get("chat_style", "qwen_instruct" if judge else "qwen2")
    return load_into(model, read_tensors(d), key_map, dtype), tok, style


LOADERS = {"prismatic": _load_prismatic, "llava_qwen": _load_llava, "llava": _load_llava,  # kind -> loader
           "open-qwen2vl": lambda d, c, vision, llm, dtype, n: (M.load_vlm(d, dtype, n), _tokenizer(d),
                                                                 c.get("chat_style", "qwen2"))}


def load_vlm(src: str, vision: str | None = None, llm: str | None = None, dtype=None,
             image_tokens: int | None = None) -> VLM:
    """Any VLM checkpoint (local dir or hub id), recognised by its config.json. `vision`/`llm`: where backbones it
    lacks come from (default: the hub ids it names). Sets `tokenizer_path` (its tokenizer.json, else its LLM's;
    model.Tokenizer adds the paper's tokens) and `chat_style` (the chat format the model was tuned with)."""
    c = read_config(d := resolve(src, ("config.json",)))
    kind = "prismatic" if "vision_backbone_id" in (c.get("model") or {}) else c.get("model_type")
    if kind not in LOADERS:
        raise ValueError(f"{d}/config.json: not a VLM layout this loads (model_type={kind!r}; known: {list(LOADERS)})"
                         + (f"; a training run's dir: its model is {src}/final" if "stage" in c else ""))
    d = resolve(src, ("*.json", "*.safetensors", "checkpoints/latest-checkpoint.pt"))  # a hub snapshot: what we read
    model, model.tokenizer_path, model.chat_style = LOADERS[kind](d, c, vision, llm, dtype, image_tokens)
    return model


# -----------------------------------------------------------------------------------------------------------------
# Export: an SFT'd Open-Qwen2VL *is* a transformers LLaVA (SigLIP block features, Linear-GELU-Linear, Qwen2), written
# in the classic llava-hf layout every tool reads (transformers v4 and v5, vLLM).

_HV, _HL = "vision_tower.vision_model.", "language_model.model."
HF_NAMES = {  # our prefix -> transformers' (llava-hf) prefix; inside blocks/layers the leaf names map by HF_LEAVES
    "vision.blocks.": _HV + "encoder.layers.", "vision.patch_embed.": _HV + "embeddings.patch_embedding.",
    "vision.pos_embed": _HV + "embeddings.position_embedding.weight", "vision.post_norm.": _HV + "post_layernorm.",
    "llm.layers.": _HL + "layers.", "llm.embed_tokens.": _HL + "embed_tokens.", "llm.norm.": _HL + "norm.",
    "llm.lm_head.": "language_model.lm_head.", "projector.fc1.": "multi_modal_projector.linear_1.",
    "projector.fc2.": "multi_modal_projector.linear_2."}
HF_LEAVES = {"norm1": "layer_norm1", "norm2": "layer_norm2", "proj": "self_attn.out_proj", "fc1": "mlp.fc1",
             "fc2": "mlp.fc2", "qkv": "self_attn.{}_proj", "gate_up": "mlp.{}_proj", "o_proj": "self_attn.o_proj",
             "down": "mlp.down_proj", "attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}


def hf_tensors(model: VLM):
    """(transformers name, tensor) for all but SigLIP's pooling head (unused by LLaVA), fused tensors split."""
    q = model.config.llm
    qkv = [q.num_heads * q.head_dim] + [q.num_kv_heads * q.head_dim] * 2
    for name, t in model.state_dict().items():
        pre = next((p for p in HF_NAMES if name.startswith(p)), None)
        if pre is None and name.startswith("vision.head."):
            continue
        if pre is None:
            raise KeyError(f"no transformers name for {name!r}")
        hf = HF_NAMES[pre] + ".".join(HF_LEAVES.get(p, p) for p in name[len(pre):].split("."))
        parts = ("gate", "up") if ".gate_up." in name else "qkv"
        sizes = qkv if pre == "llm.layers." and parts == "qkv" else t.shape[0] // len(parts)
        yield from zip(map(hf.format, parts), t.split(sizes)) if "{}" in hf else [(hf, t)]


def hf_configs(c: VLMConfig) -> tuple[dict, dict]:
    """transformers' SigLIP vision and Qwen2 config dicts of `c` (rope_theta for v4, rope_parameters for v5)."""
    v, q, act = c.vision, c.llm, {"gelu_tanh": "gelu_pytorch_tanh"}.get(c.vision.act, c.vision.act)
    return (dict(model_type="siglip_vision_model", hidden_size=v.hidden_size, intermediate_size=v.intermediate_size,
                 num_hidden_layers=v.num_layers, num_attention_heads=v.num_heads, image_size=v.image_size,
                 patch_size=v.patch_size, layer_norm_eps=v.eps, hidden_act=act, vision_use_head=False),
            dict(model_type="qwen2", vocab_size=q.vocab_size, hidden_size=q.hidden_size, head_dim=q.head_dim,
                 intermediate_size=q.intermediate_size, num_hidden_layers=q.num_layers, num_attention_heads=q.num_heads,
                 num_key_value_heads=q.num_kv_heads, rope_theta=q.rope_theta, rms_norm_eps=q.eps,
                 rope_parameters={"rope_type": "default", "rope_theta": q.rope_theta},
                 tie_word_embeddings=q.tie_embeddings))


def write_safetensors(out_dir: str, tensors, shard_bytes: int = 5_000_000_000):
    """model.safetensors, or past `shard_bytes` model-0000i-of-0000n.safetensors + transformers' index, atomically."""
    from safetensors.torch import save_file
    shards = [{}]
    for name, t in tensors:
        if shards[-1] and sum(x.nbytes for x in shards[-1].values()) + t.nbytes > shard_bytes:
            shards.append({})
        shards[-1][name] = t.detach().contiguous().cpu()
    n = len(shards)
    names = [f"model-{i + 1:05d}-of-{n:05d}.safetensors" if n > 1 else "model.safetensors" for i in range(n)]
    for name, shard in zip(names, shards):
        save_file(shard, os.path.join(out_dir, name + ".tmp"), metadata={"format": "pt"})
        os.replace(os.path.join(out_dir, name + ".tmp"), os.path.join(out_dir, name))
    if n > 1:
        index = {"metadata": {"total_size": sum(t.nbytes for s in shards for t in s.values())},
                 "weight_map": {k: f for f, s in zip(names, shards) for k in s}}
        M.write_json(os.path.join(out_dir, "model.safetensors.index.json"), index)


# The chat formats of model.chat_tokens (and MLM-Filter's qwen_instruct) as Jinja chat templates. Content is a string
# or a list of {"type": "image"} / {"type": "text", "text"} parts; processors expand each <image> to its tokens.
_CONTENT = ("{% macro content(m) %}{% if m['content'] is string %}{{ m['content'] }}{% else %}{% for p in m["
            "'content'] %}{{ '<image>' if p['type'] == 'image' else p.get('text', '') }}{% endfor %}{% endif %}"
            "{% endmacro %}{% set system = messages[0]['content'] if messages[0]['role'] == 'system' else 'SYSTEM' %}")
_TURNS = "{% for m in messages if m['role'] != 'system' %}"
_GEN = "{{ '<|im_start|>assistant\n' if add_generation_prompt }}"
CHAT_TEMPLATES = {
    "qwen2": _CONTENT.replace("SYSTEM", M.SYSTEM_PROMPT) + "<s><|im_start|>system\n{{ system }}<|im_end|>\n" + _TURNS
    + "<|im_start|>{{ m['role'] }}\n{{ content(m) | trim }}<|im_end|>\n{% endfor %}" + _GEN,
    "release": _CONTENT.replace("SYSTEM", M.SYSTEM_PROMPT) + "{% set ns = namespace(image=false) %}{% for m in messages"
    " %}{% set ns.image = ns.image or '<image>' in content(m) %}{% endfor %}{{ '<image>\n' if ns.image }}<s>"
    "<|im_start|>system\n{{ system }}<|im_end|>\n" + _TURNS + "{% set text = content(m) | replace('<image>', '') | trim"
    " %}{% if m['role'] == 'user' %}<|im_start|>user\n{{ '\n' if '<image>' in content(m) }}{{ text }}<|im_end|>"
    "assistant{% else %}{{ text }}<|im_end|>\n{% endif %}{% endfor %}",
    "qwen_instruct": _CONTENT.replace("SYSTEM", M.SYSTEM_PROMPT[:-1]) + "<|im_start|>system\n{{ system }}<|im_end|>"
    + _TURNS + "<|im_start|>{{ m['role'] }}\n{{ content(m) }}<|im_end|>{% endfor %}" + _GEN,  # no period, no newlines
}


def export_hf(src: str, out_dir: str, full_res: bool = False, dtype=None, shard_bytes: int = 5_000_000_000) -> str:
    """Any checkpoint load_vlm takes -> a transformers LLaVA dir; a pooled one (a 144-token base) only `full_res`."""
    import tokenizers
    model = load_vlm(src, dtype=dtype)
    c, grid = model.config, (model.config.vision.image_size // model.config.vision.patch_size) ** 2
    if c.max_tiles > 1:
        raise ValueError(f"{src}: tuned on up to {c.max_tiles} NVLM tiles per image; transformers' LLaVA has no tiles")
    if c.image_tokens != grid and not full_res:
        raise ValueError(f"{src}: {c.image_tokens} pooled image tokens per image; transformers' LLaVA has no pooling. "
                         f"--full-res exports it on all {grid} patches, which changes what the model sees")
    if c.image_tokens != grid:
        print(f"{src}: exported at full resolution, {grid} tokens per image, not {c.image_tokens}: it sees differently")
    if model.tokenizer_path is None:
        raise ValueError(f"{src}: no tokenizer.json in the checkpoint or with its LLM")
    hf_tok = tokenizers.Tokenizer.from_file(model.tokenizer_path)
    hf_tok.add_special_tokens(M.Tokenizer.ADDED + ["<image>"])  # Qwen's own added tokens keep their flags
    if (image_id := hf_tok.token_to_id("<image>")) >= c.llm.vocab_size:
        raise ValueError(f"{model.tokenizer_path}: <image> would be id {image_id}, past the {c.llm.vocab_size} rows")
    os.makedirs(out_dir, exist_ok=True)
    write_safetensors(out_dir, hf_tensors(model), shard_bytes)
    template, size, tid = CHAT_TEMPLATES[model.chat_style], c.vision.image_size, hf_tok.token_to_id
    for name, obj in {
        "config.json": dict(architectures=["LlavaForConditionalGeneration"], model_type="llava",
                            vision_config=hf_configs(c)[0], text_config=hf_configs(c)[1],
                            vision_feature_layer=c.feature_layer, vision_feature_select_strategy="full",
                            image_token_index=image_id, image_seq_length=grid, projector_hidden_act="gelu",
                            multimodal_projector_bias=True, tie_word_embeddings=c.llm.tie_embeddings,
                            torch_dtype=str(next(model.parameters()).dtype)[6:], chat_style=model.chat_style),
        "tokenizer_config.json": dict(tokenizer_class="Qwen2Tokenizer", eos_token="<|im_end|>",
                                      pad_token="<|endoftext|>", padding_side="left", chat_template=template),
        "preprocessor_config.json": dict(image_processor_type="SiglipImageProcessor", processor_class="LlavaProcessor",
                                         size={"height": size, "width": size}, resample=3,  # bicubic squash
                                         image_mean=[0.5] * 3, image_std=[0.5] * 3),
        "processor_config.json": dict(processor_class="LlavaProcessor", image_token="<image>",
                                      patch_size=c.vision.patch_size, vision_feature_select_strategy="full"),
        "generation_config.json": dict(eos_token_id=tid("<|im_end|>"), pad_token_id=tid("<|endoftext|>"),
                                       bos_token_id=tid("<s>")),
        "tokenizer.json": hf_tok.to_str(), "chat_template.jinja": template,  # where processors look for it
    }.items():
        M.write_json(os.path.join(out_dir, name), obj)  # atomic; a str as it is
    return out_dir


@dataclass
class ExportConfig:
    """python weights.py export-hf SRC OUT [flags]: any checkpoint load_vlm takes -> a transformers LLaVA dir."""
    full_res: bool = False  # export a pooled (144-token) checkpoint on all patches: changes what the model sees
    dtype: str | None = None  # e.g. bfloat16; default: the checkpoint's own


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    c = M.parse_config(ExportConfig, argv[3:] if len(argv) > 2 else argv[1:], prog="weights.py export-hf SRC OUT")
    if len(argv) < 3 or argv[0] != "export-hf" or argv[1].startswith("-") or argv[2].startswith("-"):
        sys.exit("usage: python weights.py export-hf SRC OUT [--full-res] [--dtype bfloat16]")
    src = M.need(argv[1], "SRC is a checkpoint dir (runs/sft/final: python sft.py) or a hub id", "config.json", True)
    out = export_hf(src, argv[2], c.full_res, c.dtype and getattr(torch, c.dtype))
    print(f"wrote {out}: {', '.join(sorted(os.listdir(out)))}")


if __name__ == "__main__":
    main()
