"""model.py against transformers (the numerical oracle) on small random configs, in fp32."""
import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model as M
import weights as W
from checkpoints import qwen_like_tokenizer

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
        i, t = (torch.nn.functional.normalize(e, dim=-1) for e in (ours.image_embeds(px), ours.text_embeds(ids)))
        assert ((i * t).sum(-1) * ours.logit_scale.exp() + ours.logit_bias - logits).abs().max() < TOL  # as filter.py


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


# ---------------------------------------------------------------------------------------------------------------
# The VLM: packed rows, generation, save/load


def tiny_vlm(image_tokens=4, seed=0):
    cfg = M.VLMConfig(M.VisionConfig(16, 4, 32, 64, 3, 4, act="gelu", use_head=False),
                      M.QwenConfig(300, 64, 128, 2, 4, 2, 16, 1e4), image_tokens)
    return M.VLM(cfg).init_weights(seed).eval()


def doc(rng, n_text, n_images=1):
    ids = [1] + [M.IMAGE_ID] * n_images + rng.integers(3, 300, n_text).tolist() + [2]
    return ids


@pytest.mark.parametrize("backend", ["docs", "mask", "flex"])
def test_packed_row_equals_documents_alone(backend):
    net = tiny_vlm()
    rng = np.random.default_rng(0)
    docs = [doc(rng, 5), doc(rng, 9, 2), doc(rng, 3)]
    images = torch.randn(4, 3, 16, 16)
    row = {"input_ids": sum(docs, []), "doc_lengths": [len(d) for d in docs]}
    batch = M.collate_rows([row], 4, 64, pad_id=0)
    with torch.no_grad():
        packed = net(batch["input_ids"], images, batch["doc_lens"], backend=backend)[0]
        start, img = 0, 0
        for d in docs:
            n_img = d.count(M.IMAGE_ID)
            alone = M.collate_rows([{"input_ids": d, "doc_lengths": [len(d)]}], 4, len(d) + 3 * n_img, 0)
            want = net(alone["input_ids"], images[img:img + n_img])[0]
            n = want.shape[0]
            assert (packed[start:start + n] - want).abs().max() < 1e-5
            start, img = start + n, img + n_img
        plain = net(batch["input_ids"], images, batch["doc_lens"], doc_mask=False)[0]
        assert (plain[start - 5:start] - packed[start - 5:start]).abs().max() > 1e-4  # the paper's mode does leak


def test_packed_loss_is_token_weighted_mean_of_documents():
    net = tiny_vlm()
    rng = np.random.default_rng(1)
    docs = [doc(rng, 7), doc(rng, 2), doc(rng, 11, 2)]
    images = torch.randn(4, 3, 16, 16)
    batch = M.collate_rows([{"input_ids": sum(docs, []), "doc_lengths": [len(d) for d in docs]}], 4, 80, 0)
    with torch.no_grad():
        total = net(batch["input_ids"], images, batch["doc_lens"], targets=batch["targets"])
        alone, img = 0.0, 0
        for d in docs:
            n_img = d.count(M.IMAGE_ID)
            b = M.collate_rows([{"input_ids": d, "doc_lengths": [len(d)]}], 4, len(d) + 3 * n_img, 0)
            alone += net(b["input_ids"], images[img:img + n_img], targets=b["targets"])
            img += n_img
    assert abs(total - alone) < 1e-4
    n_sup = int((batch["targets"] != M.IGNORE).sum())
    assert n_sup == sum(len(d) - d.count(M.IMAGE_ID) - 1 for d in docs)  # per doc: text tokens after the first


def test_collate_targets_layout():
    ids = [1, M.IMAGE_ID, 10, 11, 2, 1, 12, 2]
    b = M.collate_rows([{"input_ids": ids, "doc_lengths": [5, 3]}], 3, 14, pad_id=0)
    Im = M.IMAGE_ID
    assert b["input_ids"][0].tolist() == [1, Im, Im, Im, 10, 11, 2, 1, 12, 2, 0, 0, 0, 0]
    X = M.IGNORE  # BOS predicts an image (ignored); doc ends, padding and images are never targets
    assert b["targets"][0].tolist() == [X, X, X, 10, 11, 2, X, 12, 2, X, X, X, X, X]
    assert b["doc_lens"] == [[7, 3, 4]]
    with pytest.raises(ValueError, match="over seq_len"):
        M.collate_rows([{"input_ids": ids, "doc_lengths": [5, 3]}], 3, 9, 0)


def greedy_full_forward(net, prompt, image, n):
    out = []
    for _ in range(n):
        ids = torch.from_numpy(M.expand_images(np.array(prompt + out), net.config.image_tokens))[None]
        with torch.no_grad():
            out.append(int(net(ids, image)[0, -1].argmax()))
    return out


def test_kv_cache_generation_equals_full_forward():
    net = tiny_vlm(seed=3)
    rng = np.random.default_rng(2)
    prompts = [[1, M.IMAGE_ID] + rng.integers(3, 300, 6).tolist(), [1, M.IMAGE_ID] + rng.integers(3, 300, 2).tolist(),
               [1] + rng.integers(3, 300, 4).tolist()]
    images = torch.randn(2, 3, 16, 16)
    got = net.generate(prompts, images, max_new_tokens=12)
    want = [greedy_full_forward(net, prompts[0], images[:1], 12), greedy_full_forward(net, prompts[1], images[1:], 12),
            greedy_full_forward(net, prompts[2], None, 12)]
    assert got == want
    stop = want[0][5]
    first = want[0].index(stop)
    assert net.generate(prompts[:1], images[:1], max_new_tokens=12, stop_ids=[stop])[0] == want[0][:first]
    s1 = net.generate(prompts[:1], images[:1], 12, temperature=1.0, seed=5)
    assert s1 == net.generate(prompts[:1], images[:1], 12, temperature=1.0, seed=5)  # sampling is seeded
    assert s1 != net.generate(prompts[:1], images[:1], 12, temperature=1.0, seed=6)


def test_vlm_save_reload_bit_identical(tmp_path):
    net = tiny_vlm(seed=4)
    net.save_pretrained(str(tmp_path / "vlm"))
    again = M.VLM.from_pretrained(str(tmp_path / "vlm"))
    assert again.config == net.config
    a, b = net.state_dict(), again.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert not [f for f in os.listdir(tmp_path / "vlm") if f.endswith(".tmp")]
    bf = M.VLM.from_pretrained(str(tmp_path / "vlm"), dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in bf.parameters())


# ---------------------------------------------------------------------------------------------------------------
# Bad input names the file or tensor


def test_bad_checkpoints_name_the_culprit(tmp_path):
    ref, path = qwen_hf(tmp_path, tie=False, shard=False)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        M.Qwen2.from_pretrained(str(tmp_path / "nowhere"))
    from safetensors.torch import load_file, save_file
    st = os.path.join(path, "model.safetensors")
    sd = load_file(st)
    bad = tmp_path / "bad"
    for case in ("truncated", "shape", "unknown", "missing"):
        os.makedirs(bad / case)
        with open(os.path.join(path, "config.json")) as f, open(bad / case / "config.json", "w") as g:
            g.write(f.read())
        target = str(bad / case / "model.safetensors")
        if case == "truncated":
            data = open(st, "rb").read()
            open(target, "wb").write(data[: len(data) // 2])
            with pytest.raises(ValueError, match="model.safetensors"):
                M.Qwen2.from_pretrained(str(bad / case))
            continue
        d = dict(sd)
        if case == "shape":
            d["model.layers.1.mlp.down_proj.weight"] = torch.zeros(3, 3)
        elif case == "unknown":
            d["model.layers.0.self_attn.extra.weight"] = torch.zeros(3)
        else:
            del d["model.norm.weight"]
        save_file(d, target)
        msg = {"shape": "model.layers.1.mlp.down_proj.weight", "unknown": "model.layers.0.self_attn.extra.weight",
               "missing": "norm.weight"}[case]
        with pytest.raises((ValueError, KeyError), match=msg.replace(".", r"\.")) as e:
            M.Qwen2.from_pretrained(str(bad / case))
        assert target in str(e.value)  # the file is named too


def test_loads_straight_into_bf16(tmp_path):
    ref, path = qwen_hf(tmp_path, tie=True, shard=True)
    net = M.Qwen2.from_pretrained(path, dtype=torch.bfloat16)
    assert {p.dtype for p in net.parameters()} == {torch.bfloat16}
    assert torch.equal(net.embed_tokens.weight, ref.model.embed_tokens.weight.to(torch.bfloat16))


# ---------------------------------------------------------------------------------------------------------------
# Tokenizer and formats


def test_special_token_ids_match_the_paper(tmp_path):
    """`<s>` is an ordinary BPE token of Qwen2.5 (id 128245 there): adding it keeps its id and marks it special;
    only `<|endofchunk|>` is new. As in the official code: len(tokenizer) == 151666."""
    path = qwen_like_tokenizer(tmp_path / "tokenizer.json", base_vocab=151643)
    import tokenizers
    s_id = tokenizers.Tokenizer.from_file(path).token_to_id("<s>")
    assert s_id is not None and s_id < 151643  # a regular vocabulary entry
    tok = M.Tokenizer(path)
    assert (tok.pad_id, tok.im_start_id, tok.eos_id) == (151643, 151644, 151645)
    assert (tok.eoc_id, tok.bos_id) == (151665, s_id)
    assert len(tok) == 151666


def test_qwen_non_special_added_tokens_are_plain_text(tok):
    """Qwen2.5's <tool_call>, <|fim_prefix|>, ... are added tokens without the special flag: user text containing
    them is still encoded as plain text, and generated ids of them are kept by decode."""
    for text in ("a <tool_call> b", "x<|fim_prefix|>y</tool_call>", "<|file_sep|><|repo_name|>"):
        ids = tok.encode(text)
        assert all(i < tok.pad_id for i in ids), (text, ids)  # only byte-level pieces, no added token
        assert tok.decode(ids) == text
    fim = tok.tok.token_to_id("<|fim_prefix|>")
    assert fim > tok.pad_id and fim not in tok.special_ids
    assert tok.decode([fim, tok.tok.token_to_id("<tool_call>"), tok.eos_id]) == "<|fim_prefix|><tool_call>"
    assert tok.decode([fim, tok.eos_id], skip_special=False) == "<|fim_prefix|><|im_end|>"


@pytest.fixture
def tok(tmp_path):
    return M.Tokenizer(qwen_like_tokenizer(tmp_path / "tokenizer.json"))


def test_caption_format(tok):
    ids = M.caption_tokens(tok, "a red <|im_end|> <image>")
    assert ids[:2] == [tok.bos_id, M.IMAGE_ID] and ids[-1] == tok.eos_id
    assert ids.count(tok.eos_id) == 1 and ids.count(M.IMAGE_ID) == 1  # user text cannot inject specials or images
    assert tok.decode(ids[2:-1]) == "\na red <|im_end|> <image>"
    inter = M.interleaved_tokens(tok, [None, "an", None, "red"])
    assert inter[0] == tok.bos_id and inter[-1] == tok.eos_id and inter.count(M.IMAGE_ID) == 2
    assert inter.count(tok.eoc_id) == 2


def test_chat_formats_and_label_masks(tok):
    conv = [{"from": "human", "value": "<image>\nan red?"}, {"from": "gpt", "value": "re"},
            {"from": "human", "value": "an"}, {"from": "gpt", "value": "red"}]
    ids, labels = M.chat_tokens(tok, conv)
    text = tok.decode([i if i != M.IMAGE_ID else tok.pad_id for i in ids], skip_special=False)
    assert text == ("<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|endoftext|>\n"
                    "an red?<|im_end|>\n<|im_start|>assistant\nre<|im_end|>\n<|im_start|>user\nan<|im_end|>\n"
                    "<|im_start|>assistant\nred<|im_end|>\n")
    sup = tok.decode([i for i, lab in zip(ids, labels) if lab != M.IGNORE], skip_special=False)
    assert sup == "re<|im_end|>\nred<|im_end|>\n"
    assert all(lab in (M.IGNORE, i) for i, lab in zip(ids, labels))
    ids, labels = M.chat_tokens(tok, conv[:2], style="release")
    assert ids[0] == M.IMAGE_ID
    text = tok.decode(ids[1:], skip_special=False)
    assert text == ("\n<s><|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\nan red?"
                    "<|im_end|>assistantre<|im_end|>\n")
    with pytest.raises(ValueError, match="turn 1"):
        M.chat_tokens(tok, [conv[0], conv[0]])


def test_no_loss_on_padding(tok):
    ids, labels = M.chat_tokens(tok, [{"from": "human", "value": "an"}, {"from": "gpt", "value": "red"}])
    b = M.collate_rows([{"input_ids": ids, "doc_lengths": [len(ids)], "labels": labels}], 4, len(ids) + 20, tok.pad_id)
    t = b["targets"][0]
    assert (t[len(ids) - 1:] == M.IGNORE).all()
    assert int((t != M.IGNORE).sum()) == sum(lab != M.IGNORE for lab in labels)


# ---------------------------------------------------------------------------------------------------------------
# Images


def test_preprocess_matches_siglip_image_processor():
    from PIL import Image
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (37, 53, 3), dtype=np.uint8))
    proc = transformers.SiglipImageProcessor(size={"height": 32, "width": 32})
    want = proc(images=img, return_tensors="pt")["pixel_values"][0]
    assert (M.preprocess(img, 32) - want).abs().max() < 1e-5


def test_load_image_any_mode_and_bomb(tmp_path):
    import io

    from PIL import Image
    for mode in ("RGBA", "P", "CMYK", "L", "I;16", "LA", "1"):
        img = Image.new(mode, (9, 7))
        buf = io.BytesIO()
        img.save(buf, format="TIFF" if mode in ("CMYK", "I;16") else "PNG")
        out = M.load_image(buf.getvalue())
        assert out.mode == "RGB" and out.size == (9, 7)
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))  # fully transparent: composited on white
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    assert M.load_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    big = io.BytesIO()
    Image.new("L", (10000, 10000)).save(big, format="PNG")
    with pytest.raises(ValueError, match="bomb"):
        M.load_image(big.getvalue(), name="big.png")
    with pytest.raises(FileNotFoundError):
        M.load_image(str(tmp_path / "absent.jpg"))


# ---------------------------------------------------------------------------------------------------------------
# Command-line configs


def test_parse_config():
    import dataclasses

    @dataclasses.dataclass
    class Cfg:
        preset: str = "tiny"
        lr: float = 1e-3
        steps: int = 10
        doc_mask: bool = True
        compile: bool = False
        out: str | None = None
        inputs: list[str] = dataclasses.field(default_factory=list)

    presets = {"tiny": {"lr": 1e-3}, "paper": {"lr": 5e-5, "steps": 100}}
    c = M.parse_config(Cfg, ["--preset", "paper", "--steps", "7", "--no-doc-mask", "--compile"], presets)
    assert (c.lr, c.steps, c.doc_mask, c.compile) == (5e-5, 7, False, True)
    c = M.parse_config(Cfg, ["--compile", "false", "--doc-mask=0", "--out", "x", "--inputs", "a", "b"], presets)
    assert (c.compile, c.doc_mask, c.out, c.inputs) == (False, False, "x", ["a", "b"])
    for bad in (["--bogus", "1"], ["--steps", "x"], ["--compile", "maybe"], ["--preset", "huge"]):
        with pytest.raises((SystemExit, ValueError)):
            M.parse_config(Cfg, bad, presets)


def test_official_checkpoint_layout(tmp_path):
    """{"model": {"projector": {mlp_projector.0/2.*}, "llm_backbone": {llm.model.*, llm.lm_head.weight}}}, a tied
    head stored twice, vision from a separate SigLIP checkpoint."""
    ref, llm_path = qwen_hf(tmp_path, tie=True, shard=False)
    _, siglip_path = siglip_hf(tmp_path)
    proj = M.Projector(48, 64, 4, 4)
    sd = {"projector": {"mlp_projector.0.weight": proj.fc1.weight, "mlp_projector.0.bias": proj.fc1.bias,
                        "mlp_projector.2.weight": proj.fc2.weight, "mlp_projector.2.bias": proj.fc2.bias},
          "llm_backbone": {"llm." + k: v for k, v in ref.state_dict().items()}}
    sd["llm_backbone"]["llm.lm_head.weight"] = ref.model.embed_tokens.weight.clone()
    torch.save({"model": sd}, tmp_path / "latest-checkpoint.pt")
    net = W.load_official(str(tmp_path / "latest-checkpoint.pt"), siglip_path, llm_path, image_tokens=4).eval()
    ids = torch.randint(0, 300, (1, 9))
    with torch.no_grad():
        assert (net.llm(ids) - ref(input_ids=ids).logits).abs().max() < TOL
    assert torch.equal(net.projector.fc2.weight, proj.fc2.weight)


def test_build_vlm_from_parts(tmp_path):
    ref, llm_path = qwen_hf(tmp_path, tie=False, shard=True)
    _, siglip_path = siglip_hf(tmp_path)
    net = W.build_vlm(siglip_path, llm_path, image_tokens=4).eval()
    a = W.build_vlm(siglip_path, llm_path, image_tokens=4)
    assert torch.equal(net.projector.fc1.weight, a.projector.fc1.weight)  # seeded like the official init
    prompt = [[1, M.IMAGE_ID, 5, 6]]
    assert len(net.generate(prompt, torch.randn(1, 3, 32, 32), max_new_tokens=3)[0]) == 3


def test_text_only_batch_still_runs_the_tower_in_training():
    """Under FSDP every rank must all-gather the vision unit and reduce the projector's gradients, or a rank with a
    text-only micro-batch would leave the others waiting forever."""
    net = tiny_vlm().train()
    net.vision.requires_grad_(False)
    calls = []
    net.vision.register_forward_hook(lambda *a: calls.append(1))
    ids = torch.tensor([[1, 5, 6, 7, 2]])
    b = M.collate_rows([{"input_ids": ids[0].tolist(), "doc_lengths": [5]}], 4, 5, 0)
    net(b["input_ids"], None, b["doc_lens"], b["targets"]).backward()
    assert calls and net.projector.fc1.weight.grad is not None
    assert net.projector.fc1.weight.grad.abs().sum() == 0  # it takes part, but changes nothing
    net.eval()
    calls.clear()
    with torch.no_grad():
        net(b["input_ids"])
    assert not calls  # inference skips it


def test_hub_ids_resolve_through_the_hub_only_when_not_local(tmp_path):
    with pytest.raises(FileNotFoundError, match="hub"):
        M.Qwen2.from_pretrained("no-such-org/no-such-model")  # offline in tests: a clear error, not a hang
    with pytest.raises(FileNotFoundError, match="no such file"):
        M.Qwen2.from_pretrained(str(tmp_path / "a" / "b" / "c"))


def test_activation_checkpointing_changes_nothing():
    rng = np.random.default_rng(5)
    docs = [doc(rng, 6), doc(rng, 4, 2)]
    b = M.collate_rows([{"input_ids": sum(docs, []), "doc_lengths": [len(d) for d in docs]}], 4, 40, 0)
    images = torch.randn(3, 3, 16, 16)
    grads = []
    for ac in (False, True):
        net = tiny_vlm(seed=6).train()
        net.llm.checkpointing = ac
        loss = net(b["input_ids"], images, b["doc_lens"], b["targets"])
        loss.backward()
        grads.append((loss.detach(), [p.grad.clone() for p in net.llm.parameters()]))
    assert torch.equal(grads[0][0], grads[1][0])
    assert all(torch.allclose(a, c, atol=1e-7) for a, c in zip(grads[0][1], grads[1][1]))


def test_siglip_configs_from_sparse_hf_json():
    """Hub SigLIP config.json files leave out the keys at transformers' defaults; reading one gives the same config
    as reading transformers' complete dict."""
    vision = {"hidden_size": 1152, "image_size": 384, "intermediate_size": 4304, "model_type": "siglip_vision_model",
              "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14}
    text = {"hidden_size": 1152, "intermediate_size": 4304, "model_type": "siglip_text_model",
            "num_attention_heads": 16, "num_hidden_layers": 27}
    full_vision = transformers.SiglipVisionConfig(**vision).to_dict()
    full_text = transformers.SiglipTextConfig(**text).to_dict()
    assert W.vision_config(vision) == W.vision_config(full_vision)
    assert W.text_config(text) == W.text_config(full_text)
    assert W.vision_config(vision) == M.VisionConfig(use_head=True)  # so400m, tanh GELU as HF says
    assert W.text_config(text).projection_size == 1152  # defaults to the width


def test_load_image_palette_transparency_on_white():
    import io

    from PIL import Image
    img = Image.new("P", (3, 2), 0)
    img.putpalette([10, 20, 30] * 256)
    buf = io.BytesIO()
    img.save(buf, format="PNG", transparency=0)  # palette index 0 is transparent
    assert M.load_image(buf.getvalue()).getpixel((0, 0)) == (255, 255, 255)
    for mode, key, colour in (("RGB", (10, 20, 30), (10, 20, 30)), ("L", 7, 7)):  # a tRNS colour key: like alpha
        img = Image.new(mode, (3, 2), colour)
        img.putpixel((1, 1), (40, 50, 60) if mode == "RGB" else 90)
        buf = io.BytesIO()
        img.save(buf, format="PNG", transparency=key)
        out = M.load_image(buf.getvalue())
        assert out.getpixel((0, 0)) == (255, 255, 255)
        assert out.getpixel((1, 1)) == ((40, 50, 60) if mode == "RGB" else (90, 90, 90))  # opaque pixels unchanged
