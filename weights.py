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


# The writer beside the reader: a Siglip saved here loads with load_siglip and with transformers' SiglipModel. Ours ->
# HF names, (our name, HF name); the fused q/k/v is split back into three tensors.
_HF_BLOCK = [(r"blocks\.(\d+)\.norm([12])\.", r"encoder.layers.\1.layer_norm\2."),
             (r"blocks\.(\d+)\.qkv\.", r"encoder.layers.\1.self_attn.{}_proj."),
             (r"blocks\.(\d+)\.proj\.", r"encoder.layers.\1.self_attn.out_proj."),
             (r"blocks\.(\d+)\.(fc[12])\.", r"encoder.layers.\1.mlp.\2.")]
_HF_NAMES = {"vision.": ("vision_model.", _HF_BLOCK + [
    (r"patch_embed\.", "embeddings.patch_embedding."), (r"pos_embed", "embeddings.position_embedding.weight"),
    (r"post_norm\.", "post_layernorm."), (r"head\.in_proj\.(weight|bias)", r"head.attention.in_proj_\1"),
    (r"head\.out_proj\.", "head.attention.out_proj."), (r"head\.norm\.", "head.layernorm."),
    (r"head\.(fc[12])\.", r"head.mlp.\1.")]),
    "text.": ("text_model.", _HF_BLOCK + [
        (r"token_embed\.", "embeddings.token_embedding."), (r"pos_embed", "embeddings.position_embedding.weight"),
        (r"final_norm\.", "final_layer_norm.")])}
_HF_ACT = {"gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}


def siglip_hf_config(model: Siglip, pad_id: int, eos_id: int) -> dict:
    """transformers' SiglipConfig dict of `model` (the inverse of vision_config/text_config)."""
    v, t = model.vision.config, model.text  # SiglipText keeps no config: read it off the modules
    t = TextConfig(t.token_embed.num_embeddings, t.final_norm.normalized_shape[0], t.blocks[0].fc1.out_features,
                   len(t.blocks), t.blocks[0].heads, t.pos_embed.shape[0], t.head.out_features, t.final_norm.eps,
                   t.blocks[0].act)
    common = lambda c: dict(hidden_size=c.hidden_size, intermediate_size=c.intermediate_size,  # noqa: E731
                            num_hidden_layers=c.num_layers, num_attention_heads=c.num_heads, layer_norm_eps=c.eps,
                            hidden_act=_HF_ACT[c.act])
    return {"model_type": "siglip", "architectures": ["SiglipModel"],
            "vision_config": {"model_type": "siglip_vision_model", "image_size": v.image_size,
                              "patch_size": v.patch_size, "num_channels": 3, "vision_use_head": v.use_head,
                              **common(v)},
            "text_config": {"model_type": "siglip_text_model", "vocab_size": t.vocab_size,
                            "max_position_embeddings": t.max_positions, "projection_size": t.projection_size,
                            "pad_token_id": pad_id, "eos_token_id": eos_id, "bos_token_id": None, **common(t)}}


def save_siglip(out_dir: str, model: Siglip, tokenizer: str, pad: tuple[str, int], eos: tuple[str, int]):
    """HF SigLIP layout: config.json (vision and text configs), model.safetensors (HF names), preprocessor_config.json,
    the tokenizer (a tokenizer.json, or a SentencePiece spiece.model) and its tokenizer_config.json; pad and eos are
    the tokenizer's (token, id). Each file is written to a temp name and renamed; config.json last."""
    import shutil

    from safetensors.torch import save_file
    os.makedirs(out_dir, exist_ok=True)
    state = {}
    for name, t in model.state_dict().items():
        prefix, rest = name.split(".", 1) if "." in name else ("", name)
        hf_prefix, rules = _HF_NAMES.get(prefix + ".", ("", []))
        rx, repl = next(((rx, repl) for rx, repl in rules if re.match(rx, rest)), (None, None))
        hf = hf_prefix + (re.sub("^" + rx, repl, rest) if rx else rest)
        for part, piece in zip("qkv", t.chunk(3)) if ".qkv." in name else [("", t)]:
            state[hf.format(part)] = piece.detach().float().contiguous().cpu()
    save_file(state, os.path.join(out_dir, ".model.safetensors.tmp"), metadata={"format": "pt"})
    os.replace(os.path.join(out_dir, ".model.safetensors.tmp"), os.path.join(out_dir, "model.safetensors"))
    sp = tokenizer.endswith(".model")
    shutil.copyfile(tokenizer, os.path.join(out_dir, ".tok.tmp"))
    os.replace(os.path.join(out_dir, ".tok.tmp"), os.path.join(out_dir, "spiece.model" if sp else "tokenizer.json"))
    tok_cfg = {"tokenizer_class": "SiglipTokenizer" if sp else "PreTrainedTokenizerFast", "pad_token": pad[0],
               "eos_token": eos[0], "model_max_length": model.text.pos_embed.shape[0],
               "model_input_names": ["input_ids"]}  # no attention_mask: SigLIP attends to its pads (the converter's)
    M.write_json(os.path.join(out_dir, "tokenizer_config.json"), tok_cfg)
    size = model.vision.config.image_size
    M.write_json(os.path.join(out_dir, "preprocessor_config.json"), {
        "image_processor_type": "SiglipImageProcessor", "do_resize": True, "size": {"height": size, "width": size},
        "resample": 3, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True,
        "image_mean": [0.5] * 3, "image_std": [0.5] * 3})
    M.write_json(os.path.join(out_dir, "config.json"), siglip_hf_config(model, pad[1], eos[1]))


# The reader of a SigLIP checkpoint's tokenizer: text preprocessing equal to transformers' SiglipProcessor(text,
# padding="max_length", max_length=64, truncation=True). The text tower pools the last position: padding counts.

SPIECE = "\u2581"  # SentencePiece's word marker
NO_PUNCT = str.maketrans("", "", r"""!"#$%&'()*+,-./:;<=>?@[\]^_`{|}~""")  # string.punctuation, ASCII


class SiglipTokenizer:
    """A SigLIP checkpoint's tokenizer: `spiece.model` as transformers' SiglipTokenizer runs it (lower-case, ASCII
    punctuation removed, whitespace collapsed, `</s>` appended, padded with `</s>`), or a `tokenizer.json` (a dir's,
    or the file) as it says (normalizer, post-processor), padded with tokenizer_config.json's or `pad`'s token. Both
    truncate to `length` keeping the closing special token, as truncation=True does."""

    def __init__(self, src: str, length: int = 64, pad: str | None = None):
        d = src if os.path.isdir(src) else os.path.dirname(src)
        cfg = json.load(open(p)) if os.path.isfile(p := os.path.join(d, "tokenizer_config.json")) else {}
        token = lambda k, v: x["content"] if isinstance(x := cfg.get(k, v), dict) else x  # noqa: E731
        self.length, self.sp, self.pad = length, None, pad or token("pad_token", "</s>")
        if os.path.isdir(src) and os.path.isfile(sp := os.path.join(d, "spiece.model")):
            import sentencepiece
            if cfg.get("additional_special_tokens"):
                raise ValueError(f"{p}: additional_special_tokens are not supported")
            self.sp, self.lower = sentencepiece.SentencePieceProcessor(model_file=sp), cfg.get("do_lower_case", True)
            eos, self.unk = token("eos_token", "</s>"), token("unk_token", "<unk>")
            self.special = {t: self.sp.piece_to_id(t) for t in (eos, self.unk, self.pad)}
            self.split = re.compile("(" + "|".join(map(re.escape, sorted(self.special, key=len)[::-1])) + ")")
            self.unk_len = len(self.sp.encode(self.unk, out_type=str))
            self.eos_id, self.pad_id, self.vocab_size = self.special[eos], self.special[self.pad], len(self.sp)
        elif os.path.isfile(tj := os.path.join(src, "tokenizer.json") if os.path.isdir(src) else src):
            import tokenizers
            self.tok = tokenizers.Tokenizer.from_file(tj)
            if (pad_id := self.tok.token_to_id(self.pad)) is None:
                raise ValueError(f"{src}: pad token {self.pad!r} (tokenizer_config.json) is not in {tj}")
            self.tok.enable_truncation(length)
            self.tok.enable_padding(length=length, pad_id=pad_id, pad_token=self.pad)
            self.pad_id, self.vocab_size = pad_id, self.tok.get_vocab_size()
        else:
            raise FileNotFoundError(f"{src}: no spiece.model or tokenizer.json")

    def _pieces(self, text: str) -> list[str]:  # SiglipTokenizer._tokenize: canonicalize, then encode after <unk>
        text = re.sub(r"\s+", " ", (text.lower() if self.lower else text).translate(NO_PUNCT)).strip()
        pieces = self.sp.encode(self.unk + text, out_type=str)  # the prefix stops SentencePiece eating the marker
        return pieces[self.unk_len:] if len(pieces) >= self.unk_len else pieces

    def encode(self, text: str) -> list[int]:
        if self.sp is None:
            return self.tok.encode(text).ids
        parts = self.split.split(SPIECE + text.replace(SPIECE, " "))  # odd parts: special tokens, which strip the
        for i in range(1, len(parts), 2):  # spaces beside them (lstrip/rstrip) and are never split
            parts[i - 1], parts[i + 1] = parts[i - 1].rstrip(), parts[i + 1].lstrip()
        pieces = [p for i, part in enumerate(parts) for p in ([part] if i % 2 else self._pieces(part) if part else [])]
        if len(pieces) > 1 and pieces[0] == SPIECE and pieces[1] in self.special:
            pieces = pieces[1:]
        ids = [self.special[p] if p in self.special else self.sp.piece_to_id(p) for p in pieces][: self.length - 1]
        ids += [] if ids and ids[-1] == self.eos_id else [self.eos_id]
        return ids + [self.pad_id] * (self.length - len(ids))


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
