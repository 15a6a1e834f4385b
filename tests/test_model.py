"""model.py against transformers (the numerical oracle) on small random configs, in fp32."""
import json
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M

transformers = pytest.importorskip("transformers")
TOL = 1e-4


def qwen_hf(tmp_path, tie: bool, shard: bool, kv_heads: int = 2):
    torch.manual_seed(0)
    cfg = transformers.Qwen2Config(vocab_size=300, hidden_size=64, intermediate_size=160, num_hidden_layers=3,
                                   num_attention_heads=4, num_key_value_heads=kv_heads, rope_theta=1e4,
                                   tie_word_embeddings=tie, max_position_embeddings=512)
    ref = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initializes biases to zero; make them count
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / f"qwen-{tie}-{shard}"
    ref.save_pretrained(path, max_shard_size="100KB" if shard else "10GB")
    return ref, str(path)


@pytest.mark.parametrize("tie,shard,kv", [(True, False, 2), (False, True, 2), (False, False, 4), (True, True, 1)])
def test_qwen_logits_match_transformers(tmp_path, tie, shard, kv):
    ref, path = qwen_hf(tmp_path, tie, shard, kv)
    assert os.path.exists(os.path.join(path, "model.safetensors.index.json")) == shard
    ours = M.Qwen2.from_pretrained(path).eval()
    assert (ours.lm_head is None) == tie
    ids = torch.randint(0, 300, (2, 37))
    with torch.no_grad():
        want = ref(input_ids=ids).logits
        got = ours(ids)
    assert got.shape == (2, 37, 300)
    assert (got - want).abs().max() < TOL


def siglip_hf(tmp_path, act="gelu_pytorch_tanh"):
    torch.manual_seed(0)
    vc = dict(hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4, image_size=32,
              patch_size=8, hidden_act=act)
    tc = dict(vocab_size=100, hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=16, hidden_act=act)
    ref = transformers.SiglipModel(transformers.SiglipConfig(text_config=tc, vision_config=vc)).eval()
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("bias") or "norm" in n or "probe" in n:
                p.add_(torch.randn_like(p) * 0.1)
    path = tmp_path / "siglip"
    ref.save_pretrained(path)
    return ref, str(path)


def test_siglip_vision_features_match_transformers(tmp_path):
    ref, path = siglip_hf(tmp_path)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = ref.vision_model(pixel_values=px, output_hidden_states=True)
        ours = M.SiglipVision.from_pretrained(path).eval()
        default = ours(px)
        last = ours(px, layer=-1, norm=True)
    assert default.shape == (2, 16, 48)
    assert (default - out.hidden_states[-2]).abs().max() < TOL
    assert (last - out.last_hidden_state).abs().max() < TOL
    assert (default - out.last_hidden_state).abs().max() > 1e-2  # the two really differ


def test_siglip_vision_only_checkpoint(tmp_path):
    ref, path = siglip_hf(tmp_path)
    vis = transformers.SiglipVisionModel(ref.config.vision_config).eval()
    vis.load_state_dict(ref.vision_model.state_dict())
    vis.save_pretrained(tmp_path / "vision")
    px = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        want = vis(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        got = M.SiglipVision.from_pretrained(str(tmp_path / "vision"))(px)
    assert (got - want).abs().max() < TOL


def test_siglip_embeddings_match_transformers(tmp_path):
    ref, path = siglip_hf(tmp_path)
    ours = M.Siglip.from_pretrained(path).eval()
    px, ids = torch.randn(3, 3, 32, 32), torch.randint(0, 100, (3, 16))
    with torch.no_grad():
        img_ref = ref.get_image_features(pixel_values=px)
        txt_ref = ref.get_text_features(input_ids=ids)
        img_ref = getattr(img_ref, "pooler_output", img_ref)
        txt_ref = getattr(txt_ref, "pooler_output", txt_ref)
        assert (ours.image_embeds(px) - img_ref).abs().max() < TOL
        assert (ours.text_embeds(ids) - txt_ref).abs().max() < TOL
        logits = ref(input_ids=ids, pixel_values=px).logits_per_text.diagonal()
        assert (ours.pair_logits(ours.image_embeds(px), ours.text_embeds(ids)) - logits).abs().max() < TOL


def test_timm_layout_and_exact_gelu(tmp_path):
    """The official code ran timm's SigLIP: fused qkv, `blocks.N.*` names, (1, N, D) pos_embed, exact GELU."""
    ref, path = siglip_hf(tmp_path, act="gelu")
    from safetensors.torch import save_file
    sd, v = {}, ref.vision_model.state_dict()
    sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"] = v["embeddings.patch_embedding.weight"], v["embeddings.patch_embedding.bias"]
    sd["pos_embed"] = v["embeddings.position_embedding.weight"][None]
    for i in range(3):
        p = f"encoder.layers.{i}."
        for w in ("weight", "bias"):
            sd[f"blocks.{i}.attn.qkv.{w}"] = torch.cat([v[p + f"self_attn.{x}_proj.{w}"] for x in "qkv"])
            sd[f"blocks.{i}.attn.proj.{w}"] = v[p + f"self_attn.out_proj.{w}"]
            sd[f"blocks.{i}.norm1.{w}"], sd[f"blocks.{i}.norm2.{w}"] = v[p + f"layer_norm1.{w}"], v[p + f"layer_norm2.{w}"]
            sd[f"blocks.{i}.mlp.fc1.{w}"], sd[f"blocks.{i}.mlp.fc2.{w}"] = v[p + f"mlp.fc1.{w}"], v[p + f"mlp.fc2.{w}"]
    sd["norm.weight"], sd["norm.bias"] = v["post_layernorm.weight"], v["post_layernorm.bias"]
    os.makedirs(tmp_path / "timm")
    save_file({"visual.trunk." + k: t.contiguous() for k, t in sd.items()}, str(tmp_path / "timm" / "open_clip_model.safetensors"))
    cfg = M.VisionConfig(32, 8, 48, 96, 3, 4, act="gelu", use_head=False)
    ours = M.SiglipVision.from_pretrained(str(tmp_path / "timm"), config=cfg)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = ref.vision_model(pixel_values=px, output_hidden_states=True).hidden_states[-2]
        assert (ours(px) - want).abs().max() < TOL
        tanh = M.SiglipVision.from_pretrained(str(tmp_path / "timm"), config=cfg, act="gelu_pytorch_tanh")
        assert (tanh(px) - want).abs().max() > 1e-6  # the activation override really changes the numerics


def test_projector_pooling_is_adaptive_avg_pool():
    x = torch.randn(2, 27 * 27, 5, dtype=torch.float64)
    grid = x.transpose(1, 2).reshape(2, 5, 27, 27)
    want = F.adaptive_avg_pool2d(grid, 12).flatten(2).transpose(1, 2)
    got = M.pool_matrix(27, 12).matmul(x)
    assert torch.allclose(got, want, atol=1e-12)
    windows = [np.flatnonzero(M.pool_matrix(27, 12)[j].numpy().reshape(27, 27)[0]) for j in range(12)]
    assert [w[0] for w in windows] == [0, 2, 4, 6, 9, 11, 13, 15, 18, 20, 22, 24]  # overlapping, irregular stride
    assert all(len(w) == 3 for w in windows)
    proj = M.Projector(5, 7, 27, 729)
    xf = x.float()
    assert torch.equal(proj(xf), proj.fc2(F.gelu(proj.fc1(xf))))  # 27 -> 27 is the identity pooling
    assert M.Projector(5, 7, 27, 144)(xf).shape == (2, 144, 7)


@pytest.mark.parametrize("name", ["vision", "llm"])
def test_paper_shapes_forward(name):
    """One forward at the real shapes (SigLIP-so400m/14@384, Qwen2.5-1.5B) with random weights, in bf16."""
    cfg = M.preset("paper")
    with torch.device("meta"):
        net = M.SiglipVision(cfg.vision) if name == "vision" else M.Qwen2(cfg.llm)
    net = net.to_empty(device="cpu").to(torch.bfloat16)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_((torch.rand(p.shape, generator=g) - 0.5) * 0.04 if p.dim() > 1 else torch.ones(p.shape))
        if name == "vision":
            out = net(torch.randn(1, 3, 384, 384, dtype=torch.bfloat16))
            assert out.shape == (1, 729, 1152)
            assert sum(p.numel() for p in net.parameters()) == pytest.approx(413.0e6, rel=0.001)  # so400m without the unused MAP head
        else:
            out = net(torch.randint(0, 151936, (1, 16)))
            assert out.shape == (1, 16, 151936)
            assert sum(p.numel() for p in net.parameters()) == pytest.approx(1.54e9, rel=0.01)
    assert torch.isfinite(out.float()).all()
