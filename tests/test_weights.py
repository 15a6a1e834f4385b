"""weights.py: every VLM layout in (ours, released prismatic, MLM-Filter LLaVA-Qwen, transformers LLaVA) and the
transformers export out, against the model each checkpoint was written from and against transformers itself."""
import json
import os

import numpy as np
import pytest
import torch

import checkpoints as C
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
    return C.qwen_like_tokenizer(tmp_path / "tokenizer.json")


# ---------------------------------------------------------------------------------------------------------------
# In: our own format, the released prismatic layout, the MLM-Filter judge


def test_own_format_records_feature_layer_and_old_configs_load_as_minus_2(tmp_path):
    net = C.random_vlm(tiny_config(feature_layer=-1), seed=1)
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
    net = C.random_vlm(tiny_config(image_tokens, act="gelu", tie=tie), seed=2)
    run = C.write_prismatic(str(tmp_path / "run"), net)
    vision = C.write_hf_vision(str(tmp_path / "siglip"), net, act="gelu_pytorch_tanh")
    llm = C.write_hf_qwen(str(tmp_path / "qwen"), net, tok_path)
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
    net = C.random_vlm(tiny_config(4, act="gelu_tanh", tie=True, feature_layer=-1), seed=3)
    d = C.write_llava_qwen(str(tmp_path / "judge"), net, tok_path, tower=tower)
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
    net = C.random_vlm(tiny_config(4, act="gelu_tanh", tie=False, feature_layer=-1), seed=4)
    same_model(net, W.load_vlm(C.write_llava_qwen(str(tmp_path / "judge"), net, tok_path)))


# ---------------------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the file


def test_bad_inputs_name_the_file(tmp_path, tok_path):
    net = C.random_vlm(tiny_config(4), seed=5)
    run = C.write_prismatic(str(tmp_path / "run"), net)
    vision = C.write_hf_vision(str(tmp_path / "siglip"), net)
    llm = C.write_hf_qwen(str(tmp_path / "qwen"), net, tok_path)
    pt = os.path.join(run, "checkpoints", "latest-checkpoint.pt")
    data = open(pt, "rb").read()
    open(pt, "wb").write(data[: len(data) // 2])
    with pytest.raises(ValueError, match="latest-checkpoint.pt"):
        W.load_vlm(run, vision=vision, llm=llm)

    import argparse  # a pickle that needs more than tensors to load (weights_only refuses it; it never runs code)
    torch.save({"model": {"projector": argparse.Namespace(x=1), "llm_backbone": {}}}, pt)
    with pytest.raises(ValueError, match="latest-checkpoint.pt"):
        W.load_vlm(run, vision=vision, llm=llm)

    bad = C.write_prismatic(str(tmp_path / "unknown"), net, vision_id="clip-vit-l-336px")
    with pytest.raises(ValueError, match=r"config\.json.*'clip-vit-l-336px'"):
        W.load_vlm(bad, llm=llm)

    export = W.export_hf(own_checkpoint(tmp_path, net), str(tmp_path / "hf"), full_res=True)
    with open(os.path.join(export, "config.json")) as f:
        c = json.load(f)
    c["vision_config"]["model_type"] = "clip_vision_model"  # a LLaVA-1.5 style CLIP tower
    M.write_json(os.path.join(export, "config.json"), c)
    with pytest.raises(ValueError, match=r"hf/config\.json.*clip_vision_model"):
        W.load_vlm(export)

    M.write_json(str(tmp_path / "config.json"), {"model_type": "bert"})
    with pytest.raises(ValueError, match=r"config\.json.*bert"):
        W.load_vlm(str(tmp_path))


# ---------------------------------------------------------------------------------------------------------------
# Out: the transformers export


def transformers_or_skip():
    return pytest.importorskip("transformers")


def own_checkpoint(tmp_path, net, chat_style=None):
    d = str(tmp_path / "own")
    net.save_pretrained(d)
    C.qwen_like_tokenizer(os.path.join(d, "tokenizer.json"))
    if chat_style:  # as sft.py records it
        with open(os.path.join(d, "config.json")) as f:
            M.write_json(os.path.join(d, "config.json"), {**json.load(f), "chat_style": chat_style})
    return d


def hf_image_features(hf, pixel_values):
    out = hf.model.get_image_features(pixel_values=pixel_values)
    return torch.stack(list(getattr(out, "pooler_output", out)))  # transformers v5: a list per image; v4: a tensor


def test_export_parity_with_transformers(tmp_path):
    """A random tiny full-resolution VLM with perturbed biases, exported: transformers loads it with no custom code
    and agrees on logits, projected image features, the processor's pixel values and input ids, and greedy
    generation; importing the export back gives bit-identical weights."""
    transformers = transformers_or_skip()
    from PIL import Image
    net = C.random_vlm(tiny_config(16, act="gelu", tie=True), seed=6)
    out = W.export_hf(own_checkpoint(tmp_path, net), str(tmp_path / "hf"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "preprocessor_config.json",
            "processor_config.json", "generation_config.json", "chat_template.jinja"} <= set(os.listdir(out))
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info  # no missing, unexpected or mismatched tensor
    hf.eval()
    auto = transformers.AutoModelForImageTextToText.from_pretrained(out).eval()
    proc = transformers.AutoProcessor.from_pretrained(out)
    tok = M.Tokenizer(os.path.join(out, "tokenizer.json"))

    img = Image.fromarray(np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8))
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nan red?"}]}]
    enc = proc(images=img, text=proc.apply_chat_template(msgs, add_generation_prompt=True), return_tensors="pt")
    px = M.preprocess(img, 16)[None]
    assert torch.equal(enc["pixel_values"], px)  # the processor is our preprocessing
    ids, _ = M.chat_tokens(tok, [{"from": "human", "value": "<image>\nan red?"}, {"from": "gpt", "value": "x"}])
    ours = ids[: len(ids) - 3]  # up to and with "assistant\n", before the reply
    image_id = hf.config.image_token_id if hasattr(hf.config, "image_token_id") else hf.config.image_token_index
    theirs = enc["input_ids"][0].tolist()
    assert [M.IMAGE_ID if i == image_id else i for i in theirs] == M.expand_images(np.array(ours), 16).tolist()
    with torch.no_grad():
        x = torch.tensor([[M.IMAGE_ID if i == image_id else i for i in theirs]])
        want = net(x, px)
        print("export parity: max |logits diff|", float((hf(**enc).logits - want).abs().max()), "features",
              float((hf_image_features(hf, enc["pixel_values"]) - net.image_features(px)).abs().max()))
        assert (hf(**enc).logits - want).abs().max() <= 1e-4
        assert (auto(**enc).logits - want).abs().max() <= 1e-4
        assert (hf_image_features(hf, enc["pixel_values"]) - net.image_features(px)).abs().max() <= 1e-5
        gen = hf.generate(**enc, max_new_tokens=12, do_sample=False)[0, len(theirs):].tolist()
    mine = net.generate([ours], px, max_new_tokens=12, stop_ids=[tok.eos_id])[0]
    print("greedy, transformers:", gen, "ours:", mine)
    assert len(set(mine)) >= 3 and gen[: len(mine)] == mine and (len(mine) == 12 or gen[len(mine)] == tok.eos_id)
    same_model(net, W.load_vlm(out))  # the export reads back bit-identically


@pytest.mark.parametrize("style", ["qwen2", "release"])
def test_exported_chat_template_is_our_chat_format(tmp_path, style):
    transformers = transformers_or_skip()
    net = C.random_vlm(tiny_config(16), seed=7)
    out = W.export_hf(own_checkpoint(tmp_path, net, chat_style=style), str(tmp_path / "hf"))
    hf_tok = transformers.AutoTokenizer.from_pretrained(out)
    tok = M.Tokenizer(os.path.join(out, "tokenizer.json"))
    conv = [{"from": "human", "value": "<image>\nan red?"}, {"from": "gpt", "value": "re"}]
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "\nan red?"}]},
            {"role": "assistant", "content": [{"type": "text", "text": "re"}]}]
    text = hf_tok.apply_chat_template(msgs, tokenize=False)
    image_id = hf_tok.convert_tokens_to_ids("<image>")
    got = [M.IMAGE_ID if i == image_id else i for i in hf_tok(text, add_special_tokens=False)["input_ids"]]
    assert got == M.chat_tokens(tok, conv, style=style)[0]
    assert W.load_vlm(out).chat_style == style


def test_export_shards_past_the_limit_with_an_index(tmp_path):
    transformers = transformers_or_skip()
    net = C.random_vlm(tiny_config(16, tie=False), seed=8)
    out = W.export_hf(own_checkpoint(tmp_path, net), str(tmp_path / "hf"), shard_bytes=100_000)
    with open(os.path.join(out, "model.safetensors.index.json")) as f:
        index = json.load(f)
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and not os.path.exists(os.path.join(out, "model.safetensors"))
    assert all(os.path.isfile(os.path.join(out, s)) for s in shards)
    hf, info = transformers.LlavaForConditionalGeneration.from_pretrained(out, output_loading_info=True)
    assert not any(info.values()), info
    same_model(net, W.load_vlm(out))


def test_export_refuses_a_pooled_checkpoint_unless_full_res(tmp_path, capsys):
    net = C.random_vlm(tiny_config(4), seed=9)
    src = own_checkpoint(tmp_path, net)
    with pytest.raises(ValueError, match="--full-res"):
        W.export_hf(src, str(tmp_path / "hf"))
    W.main(["export-hf", src, str(tmp_path / "hf"), "--full-res"])
    assert "full resolution" in capsys.readouterr().out
    with open(tmp_path / "hf" / "config.json") as f:
        assert json.load(f)["image_seq_length"] == 16
    got = W.load_vlm(str(tmp_path / "hf"))
    assert got.config.image_tokens == 16 and torch.equal(got.projector.fc1.weight, net.projector.fc1.weight)
