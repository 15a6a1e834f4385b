"""Writers of the checkpoint layouts weights.py reads, for tests: a VLM of ours written as the released Open-Qwen2VL
prismatic run dir, the MLM-Filter (LLaVA-Qwen) judge, or plain HF SigLIP / Qwen2 dirs, plus a small Qwen-like
tokenizer. Names follow weights.hf_tensors (transformers' llava-hf layout), renamed per format (formats.md §3-4).
Import from a test file: `from checkpoints import write_llava_qwen` (tests/ is on sys.path, see conftest.py)."""
import os
import shutil

import torch
from safetensors.torch import save_file

import model as M
import weights as W

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_TEXT_ADDED = ["<tool_call>", "</tool_call>", "<|fim_prefix|>", "<|fim_middle|>", "<|fim_suffix|>", "<|fim_pad|>",
                   "<|repo_name|>", "<|file_sep|>"]  # added tokens Qwen2.5 marks non-special


def qwen_like_tokenizer(path, base_vocab=None) -> str:
    """A byte-level BPE like Qwen2.5's: its split regex, `<s>` as an ordinary merged token (Qwen2.5 has it, id 128245),
    `base_vocab` regular entries, then Qwen2.5's 22 added tokens in order with its special flags."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(alphabet))}
    merges = [("Ġ", "a"), ("Ġa", "n"), ("r", "e"), ("Ġ", "re"), ("Ġre", "d"), ("<", "s"), ("<s", ">")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    for i in range(len(vocab), base_vocab or len(vocab)):
        vocab[f"<unused{i}>"] = i
    t = Tokenizer(models.BPE(vocab, merges))
    pat = r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pat), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t.decoder = decoders.ByteLevel()
    t.add_special_tokens(QWEN_SPECIALS)
    t.add_tokens([AddedToken(s, special=False, normalized=False) for s in QWEN_TEXT_ADDED])
    t.save(str(path))
    return str(path)


def random_vlm(cfg: M.VLMConfig, seed: int = 0, scale: float = 8.0) -> M.VLM:
    """init_weights, then biases and norms perturbed so that a wrong mapping of any of them shows, and matrices
    scaled (std 0.02 * scale) so that greedy decoding is not one token repeated."""
    net = M.VLM(cfg).init_weights(seed).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, p in net.named_parameters():
            if name.endswith("bias") or "norm" in name:
                p.add_(torch.randn(p.shape, generator=g) * 0.1)
            elif p.dim() > 1:
                p.mul_(scale)
    return net


def _renamed(vlm, table: dict) -> dict:
    """hf_tensors with each matching prefix renamed (prefix -> new prefix); tensors under no prefix are dropped."""
    out = {}
    for name, t in W.hf_tensors(vlm):
        pre = next((p for p in table if name.startswith(p)), None)
        if pre is not None:
            out[table[pre] + name[len(pre):]] = t.detach().clone().contiguous()
    return out


def write_hf_vision(out_dir, vlm, act: str = "gelu_pytorch_tanh") -> str:
    """The VLM's tower as an HF SigLIP vision checkpoint. Its config says `act` (google's say tanh) whatever the
    tower ran: the official code runs exact GELU on weights whose config says tanh."""
    os.makedirs(out_dir, exist_ok=True)
    M.write_json(os.path.join(out_dir, "config.json"), {**W.hf_configs(vlm.config)[0], "hidden_act": act})
    save_file(_renamed(vlm, {"vision_tower.": ""}), os.path.join(out_dir, "model.safetensors"))
    return str(out_dir)


def write_hf_qwen(out_dir, vlm, tokenizer_path=None) -> str:
    """The VLM's LLM as an HF Qwen2ForCausalLM checkpoint (with the tokenizer.json, if given)."""
    os.makedirs(out_dir, exist_ok=True)
    M.write_json(os.path.join(out_dir, "config.json"), W.hf_configs(vlm.config)[1])
    save_file(_renamed(vlm, {"language_model.": ""}), os.path.join(out_dir, "model.safetensors"))
    if tokenizer_path:
        shutil.copy(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
    return str(out_dir)


def write_prismatic(run_dir, vlm, vision_id="siglip-vit-so400m-384px", llm_id="qwen2.5-1.5b-instruct") -> str:
    """A released Open-Qwen2VL run dir: a draccus config.json naming the backbones by registry id, and
    checkpoints/latest-checkpoint.pt = {"model": {"projector": {mlp_projector.0/2.*}, "llm_backbone": {llm.*}}},
    the tied head stored twice, as the official code saves. Vision and LLM weights are not in it (write_hf_vision,
    write_hf_qwen give local dirs for load_vlm's vision=/llm=)."""
    n = vlm.config.image_tokens
    arch = "no-align+avgpool" if n == 144 else f"full-align+{n}-avgpool"
    os.makedirs(os.path.join(run_dir, "checkpoints"), exist_ok=True)
    M.write_json(os.path.join(run_dir, "config.json"), {"model": {
        "model_id": "test", "vision_backbone_id": vision_id, "llm_backbone_id": llm_id, "arch_specifier": arch,
        "image_resize_strategy": "resize-naive", "llm_max_length": 4096}, "mount_path": "Qwen"})
    llm = _renamed(vlm, {"language_model.": "llm."})
    llm.setdefault("llm.lm_head.weight", llm["llm.model.embed_tokens.weight"].clone())
    proj = _renamed(vlm, {"multi_modal_projector.linear_1.": "mlp_projector.0.",
                          "multi_modal_projector.linear_2.": "mlp_projector.2."})
    torch.save({"model": {"projector": proj, "llm_backbone": llm}},
               os.path.join(run_dir, "checkpoints", "latest-checkpoint.pt"))
    return str(run_dir)


def write_llava_qwen(out_dir, vlm, tokenizer_path, tower: bool = True) -> str:
    """The VLM in the released mlm-filter-qwen2.5-1.5b-gpt4o layout (formats.md §3.2): config.json with
    model_type llava_qwen, the mm_* fields and Qwen2's fields; model.safetensors with the LLM under `model.*`, the
    projector under `model.mm_projector.mlp_projector.{0,2}.*` and (tower=True) the SigLIP tower under
    `model.vision_tower.vision_tower.vision_model.*`; the tokenizer.json. mm_vision_tower points at a local HF SigLIP
    dir (OUT/vision_tower) holding its config, and its weights when tower=False."""
    c = vlm.config
    os.makedirs(out_dir, exist_ok=True)
    vdir = write_hf_vision(os.path.join(out_dir, "vision_tower"), vlm, W.hf_configs(c)[0]["hidden_act"])
    if tower:
        os.remove(os.path.join(vdir, "model.safetensors"))
    M.write_json(os.path.join(out_dir, "config.json"), {
        **W.hf_configs(c)[1], "model_type": "llava_qwen", "architectures": ["LlavaQwenForCausalLM"],
        "mm_vision_tower": os.path.abspath(vdir), "mm_projector_type": "aapool_mlp",
        "mm_num_image_tokens": c.image_tokens, "mm_hidden_size": c.vision.hidden_size,
        "mm_vision_select_layer": c.feature_layer, "mm_vision_select_feature": "patch", "mm_patch_merge_type": "flat",
        "image_aspect_ratio": "pad", "mm_use_im_start_end": False, "mm_use_im_patch_token": False,
        "use_mm_proj": True, "tokenizer_padding_side": "right", "tokenizer_model_max_length": 4096})
    table = {"language_model.model.": "model.", "language_model.lm_head.": "lm_head.",
             "multi_modal_projector.linear_1.": "model.mm_projector.mlp_projector.0.",
             "multi_modal_projector.linear_2.": "model.mm_projector.mlp_projector.2."}
    if tower:
        table["vision_tower."] = "model.vision_tower.vision_tower."
    save_file(_renamed(vlm, table), os.path.join(out_dir, "model.safetensors"))
    shutil.copy(tokenizer_path, os.path.join(out_dir, "tokenizer.json"))
    return str(out_dir)
