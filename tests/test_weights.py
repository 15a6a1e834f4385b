"""weights.py: every VLM layout in (ours, released prismatic, MLM-Filter LLaVA-Qwen, transformers LLaVA) and the
transformers export out, against the model each checkpoint was written from and against transformers itself."""
import json
import os

import numpy as np
import pytest
import torch
from checkpoints import (qwen_like_tokenizer, random_vlm, write_hf_qwen, write_hf_vision, write_llava_qwen,
                         write_prismatic)

import model as M
import weights as W


def tiny_config(image_tokens=16, act="gelu", tie=True, feature_layer=-2, vocab=384) -> M.VLMConfig:
    """A 16 px tower with 4 px patches: a 4x4 grid, 16 tokens at full resolution, 4 pooled."""
    return M.VLMConfig(M.VisionConfig(16, 4, 32, 64, 3, 4, act=act, use_head=False),
                       M.QwenConfig(vocab, 64, 128, 2, 4, 2, 16, 1e4, tie_embeddings=tie), image_tokens, feature_layer)


def prompt(net, n_images=1, seed=0):
    """ids (1, T) with the image positions expanded, and pixel values."""
    rng = np.random.default_rng(seed)
    ids = [1] + [M.IMAGE_ID] * (net.config.image_tokens * n_images) + rng.integers(3, 280, 7).tolist()
    s = net.config.vision.image_size
    return torch.tensor([ids]), torch.randn(n_images, 3, s, s, generator=torch.Generator().manual_seed(seed))


def same_model(a, b):
    """Bit-identical weights and configs, and so the same logits on an image + text prompt."""
    assert a.config == b.config
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ids, px = prompt(a)
    with torch.no_grad():
        assert torch.equal(a(ids, px), b(ids, px))


@pytest.fixture
def tok_path(tmp_path):
    return qwen_like_tokenizer(tmp_path / "tokenizer.json")


# ---------------------------------------------------------------------------------------------------------------
# In: our own format, the released prismatic layout, the MLM-Filter judge


def test_own_format_records_feature_layer_and_old_configs_load_as_minus_2(tmp_path):
    net = random_vlm(tiny_config(feature_layer=-1), seed=1)
    net.save_pretrained(str(tmp_path / "own"))
    with open(tmp_path / "own" / "config.json") as f:
        c = json.load(f)
    assert c["feature_layer"] == -1
    again = W.load_vlm(str(tmp_path / "own"))
    same_model(net, again)
    assert again.tokenizer_path is None and again.chat_style == "qwen2"
    del c["feature_layer"]  # a checkpoint saved before the field existed
    M.write_json(str(tmp_path / "own" / "config.json"), c)
    assert W.load_vlm(str(tmp_path / "own")).config.feature_layer == -2


@pytest.mark.parametrize("tie,image_tokens", [(True, 16), (False, 4)])
def test_prismatic_layout_gives_the_same_model(tmp_path, tok_path, tie, image_tokens):
    """A VLM written as a released run dir (official key names, the tied head stored twice, vision and LLM as
    separate HF dirs) loads back bit-identically, with the registry's exact GELU although the HF SigLIP config says
    tanh, the token count from the arch specifier, and the LLM's tokenizer."""
    net = random_vlm(tiny_config(image_tokens, act="gelu", tie=tie), seed=2)
    run = write_prismatic(str(tmp_path / "run"), net)
    vision = write_hf_vision(str(tmp_path / "siglip"), net, act="gelu_pytorch_tanh")
    llm = write_hf_qwen(str(tmp_path / "qwen"), net, tok_path)
    got = W.load_vlm(run, vision=vision, llm=llm)
    same_model(net, got)
    assert got.tokenizer_path == os.path.join(llm, "tokenizer.json") and got.chat_style == "release"
    assert M.Tokenizer(got.tokenizer_path).eoc_id is not None  # the paper's tokens are added on load
    bf = W.load_vlm(run, vision=vision, llm=llm, dtype=torch.bfloat16)
    assert {p.dtype for p in bf.parameters()} == {torch.bfloat16}
    assert W.load_vlm(run, vision=vision, llm=llm, image_tokens=16).config.image_tokens == 16  # low-to-high


@pytest.mark.parametrize("tower", [True, False])
def test_llava_qwen_layout_gives_the_same_model(tmp_path, tok_path, tower):
    """The MLM-Filter judge: last-block features and tanh GELU, 144-style pooled tokens, tower weights in the
    checkpoint or from mm_vision_tower."""
    net = random_vlm(tiny_config(4, act="gelu_tanh", tie=True, feature_layer=-1), seed=3)
    d = write_llava_qwen(str(tmp_path / "judge"), net, tok_path, tower=tower)
    got = W.load_vlm(d)
    same_model(net, got)
    assert (got.config.feature_layer, got.config.vision.act) == (-1, "gelu_tanh")
    assert got.tokenizer_path == os.path.join(d, "tokenizer.json")
    assert all(b.approximate == "tanh" for b in got.vision.blocks)
    px = prompt(net)[1]
    with torch.no_grad():  # the last block is computed and used: block 25's features would differ
        assert torch.equal(got.image_features(px), got.projector(got.vision(px, layer=-1)))
        assert (got.image_features(px) - got.projector(got.vision(px, layer=-2))).abs().max() > 1e-4


def test_llava_qwen_untied_head(tmp_path, tok_path):
    net = random_vlm(tiny_config(4, act="gelu_tanh", tie=False, feature_layer=-1), seed=4)
    same_model(net, W.load_vlm(write_llava_qwen(str(tmp_path / "judge"), net, tok_path)))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file


def test_bad_inputs_name_the_file(tmp_path, tok_path):
    net = random_vlm(tiny_config(4), seed=5)
    run = write_prismatic(str(tmp_path / "run"), net)
    vision = write_hf_vision(str(tmp_path / "siglip"), net)
    llm = write_hf_qwen(str(tmp_path / "qwen"), net, tok_path)
    pt = os.path.join(run, "checkpoints", "latest-checkpoint.pt")
    data = open(pt, "rb").read()
    open(pt, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="latest-checkpoint.pt"):
        W.load_vlm(run, vision=vision, llm=llm)

    import argparse  # a pickle that needs more than tensors to load (weights_only refuses it; it never runs code)
    torch.save({"model": {"projector": argparse.Namespace(x=1), "llm_backbone": {}}}, pt)
    with pytest.raises(ValueError, match="latest-checkpoint.pt"):
        W.load_vlm(run, vision=vision, llm=llm)

    bad = write_prismatic(str(tmp_path / "unknown"), net, vision_id="clip-vit-l-336px")
    with pytest.raises(ValueError, match=r"config\.json.*'clip-vit-l-336px'"):
        W.load_vlm(bad, llm=llm)

    export = W.export_hf(write_prismatic(str(tmp_path / "run2"), net), str(tmp_path / "hf"), full_res=True,
                         vision=vision, llm=llm)
    with open(os.path.join(export, "config.json")) as f:
        c = json.load(f)
    c["vision_config"]["model_type"] = "clip_vision_model"  # a LLaVA-1.5 style CLIP tower
    M.write_json(os.path.join(export, "config.json"), c)
    with pytest.raises(ValueError, match=r"hf/config\.json.*clip_vision_model"):
        W.load_vlm(export)

    M.write_json(str(tmp_path / "config.json"), {"model_type": "bert"})
    with pytest.raises(ValueError, match=r"config\.json.*bert"):
        W.load_vlm(str(tmp_path))
