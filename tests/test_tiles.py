"""NVLM's dynamic high resolution with 1-D tile tags (model.tile_image, model.expand_tiles, sft.py/eval.py
--max-tiles): InternVL's grid rule, tiles that reassemble the resized image, the tags before the right tiles in every
prompt format, masks, packed == unpacked with tiled images, eval's prompts and pixels, the export's refusal, and the
toy world's small print."""
import base64
import io
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

import eval as E
import model as M
import pack
import sft
import toyworld
import train
import weights as W

torch.set_num_threads(1)
SIZE = 64  # the tiny tower's image size


def noise(w, h, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


def image_bytes(w, h, seed=0, fmt="PNG") -> bytes:
    buf = io.BytesIO()
    noise(w, h, seed).save(buf, fmt)
    return buf.getvalue()


# (w, h, size, max_tiles) -> (columns, rows), worked out by hand from InternVL's find_closest_aspect_ratio and
# dynamic_preprocess (internvl_chat/internvl/train/dataset.py at 1831ceb9): candidates (i, j) with 1 <= i*j <= max
# sorted by i*j; strictly nearer ratio wins; on an equal distance the later grid wins iff w*h > 0.5*size^2*i*j.
GRIDS = [
    ((128, 128, 64, 6), (2, 2)),  # square: (1,1) d=0, then (2,2) ties and 16384 > 8192
    ((100, 100, 64, 6), (2, 2)),  # 10000 > 8192
    ((64, 64, 64, 6), (1, 1)),  # 4096 is not over 8192: one tile, no thumbnail
    ((10, 10, 64, 6), (1, 1)),  # tiny square
    ((10, 20, 64, 6), (1, 2)),  # tiny 1:2: exact ratio first, no later tie; upsampled onto 2 tiles
    ((200, 100, 64, 6), (2, 1)),  # 2:1: (4,2) is over 6 tiles
    ((256, 128, 64, 8), (4, 2)),  # 2:1 with 8 allowed: (4,2) ties (2,1) and 32768 > 16384
    ((100, 300, 64, 6), (1, 3)),  # 1:3
    ((4000, 3000, 448, 6), (3, 2)),  # huge 4:3: (1,1) -> (2,2) on the tie -> (3,2) nearer (d 1/6 < 1/3)
    ((192, 128, 64, 4), (2, 2)),  # 3:2: (1,1) d .5, (2,1) ties and wins, (2,2) ties and wins
    ((24, 16, 64, 4), (1, 1)),  # 3:2 but small: every tie loses
    ((1, 500, 64, 6), (1, 6)),  # 1 px wide: the tallest grid
    ((500, 1, 64, 6), (6, 1)),  # 1 px high
    ((1, 1, 64, 6), (1, 1)),
    ((4000, 3000, 448, 1), (1, 1)),  # max_tiles 1: the one squash
    ((448, 448, 448, 12), (1, 1)),  # (2,2) would need over 2 * 448^2 pixels
    ((1344, 448, 448, 12), (3, 1)),  # exact 3:1; (6,2) ties, 602112 is not over 0.5*448^2*12 = 1204224
]


@pytest.mark.parametrize("args,grid", GRIDS)
def test_grid_is_internvls_and_tiles_reassemble_the_resized_image(args, grid):
    w, h, size, max_tiles = args
    img = noise(w, h, seed=w * 7 + h)
    tiles = M.tile_image(img, size, max_tiles)
    i, j = grid
    assert len(tiles) == i * j + (i * j > 1) and all(t.size == (size, size) for t in tiles)
    whole = Image.new("RGB", (i * size, j * size))
    for k, t in enumerate(tiles[: i * j]):  # row-major
        whole.paste(t, ((k % i) * size, (k // i) * size))
    assert np.array_equal(np.asarray(whole), np.asarray(img.resize((i * size, j * size), Image.Resampling.BICUBIC)))
    if i * j > 1:  # the thumbnail last: the plain squash
        assert torch.equal(torch.from_numpy(np.array(tiles[-1])).permute(2, 0, 1), M.image_to_uint8(img, size))
    assert len(M.tile_image(img, size, max_tiles, thumbnail=False)) == i * j


def test_one_tile_is_todays_squash():
    img = noise(90, 50)
    (t,) = M.tile_image(img, SIZE, 1)
    assert torch.equal(M.image_to_uint8(t, SIZE), M.image_to_uint8(img, SIZE))


# -----------------------------------------------------------------------------------------------------------------
# Tags in every prompt format


@pytest.fixture(scope="module")
def tok(toy_world):
    return M.Tokenizer(os.path.join(toy_world, "tokenizer.json"))


def layout(tok, ids) -> str:
    return "".join("[img]" if i == M.IMAGE_ID else tok.decode([i], skip_special=False) for i in ids)


TAGS5 = "<tile_1>[img]<tile_2>[img]<tile_3>[img]<tile_4>[img]<tile_global_thumbnail>[img]"


def test_tags_stand_before_their_tiles_in_both_chat_styles_and_paper_prompts(tok):
    turns = [{"from": "human", "value": "<image>\nWhat is written?"}, {"from": "gpt", "value": "cat"}]
    ids, labels = M.chat_tokens(tok, turns)
    got, lab = M.expand_tiles(tok, ids, [5], labels)
    assert f"<|im_start|>user\n{TAGS5}\nWhat is written?<|im_end|>" in layout(tok, got)
    assert got.count(M.IMAGE_ID) == 5
    assert [t for t, y in zip(got, lab) if y != M.IGNORE] == [t for t, y in zip(ids, labels) if y != M.IGNORE]
    assert all(y == M.IGNORE for t, y in zip(got, lab) if t not in ids or t == M.IMAGE_ID)  # no tag supervised
    ids, labels = M.chat_tokens(tok, turns, style="release")
    got, lab = M.expand_tiles(tok, ids, [5], labels)
    assert layout(tok, got).startswith(TAGS5 + "\n<s><|im_start|>system\n")
    assert [t for t, y in zip(got, lab) if y != M.IGNORE] == [t for t, y in zip(ids, labels) if y != M.IGNORE]
    text, _ = E.paper_prompt("textvqa", {"question": "What is written?", "images": ["x"]})
    ids = M.expand_tiles(tok, E.encode_prompt(tok, text, False, "qwen2", None), [3])[0]
    assert layout(tok, ids).startswith("<s><tile_1>[img]<tile_2>[img]<tile_global_thumbnail>[img]\nQuestion: What")
    # two images: each its own tags, numbering restarts; an untiled image (1 tile) is its own global thumbnail
    two = M.chat_tokens(tok, [{"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "no"}])
    got = layout(tok, M.expand_tiles(tok, two[0], [3, 1], two[1])[0])
    assert "user\n<tile_1>[img]<tile_2>[img]<tile_global_thumbnail>[img]\n<tile_global_thumbnail>[img]\nSame?" in got


# -----------------------------------------------------------------------------------------------------------------
# SFT: prepared documents, truncation, packed == unpacked


@pytest.fixture(scope="module")
def init(tok, toy_world, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("init") / "final")
    M.VLM(M.preset("tiny", vocab_size=-(-len(tok) // 64) * 64)).init_weights(3).save_pretrained(d)
    shutil.copyfile(os.path.join(toy_world, "tokenizer.json"), os.path.join(d, "tokenizer.json"))
    return d


SHAPES = [(128, 128), (128, 64), (64, 192), (40, 40), (300, 100)]  # 4+1, 2+1, 3+1, 1, 3+1 images


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    d = tmp_path_factory.mktemp("src")
    (d / "img").mkdir()
    for k, (w, h) in enumerate(SHAPES):
        (d / "img" / f"{k}.jpg").write_bytes(image_bytes(w, h, k, "JPEG"))
    recs = []
    for n in range(24):
        k = n % len(SHAPES)
        if n % 6 == 5:  # two images
            recs.append({"id": str(n), "image": [f"img/{k}.jpg", "img/1.jpg"], "conversations": [
                {"from": "human", "value": "<image>\n<image>\nSame?"}, {"from": "gpt", "value": "no"}]})
        else:
            recs.append({"id": str(n), "image": f"img/{k}.jpg", "conversations": [
                {"from": "human", "value": "<image>\nWhat is written?"}, {"from": "gpt", "value": "cat " * (n % 4 + 1)},
                {"from": "human", "value": "And the colour?"}, {"from": "gpt", "value": "red"}]})
    (d / "sft.json").write_text(json.dumps(recs))
    return d, recs


def config(init, out, *flags):
    return M.parse_config(sft.Config, ["--init", init, "--out", str(out), "--prep-workers", "1", *flags], sft.PRESETS)


def test_sft_document_holds_every_tile_after_its_tag(tok, init, sources, tmp_path):
    d, recs = sources
    cfg = config(init, tmp_path / "o", "--max-tiles", "4", "--tile-tokens", "16", "--seq-len", "1024")
    assert cfg.image_tokens == 16 and cfg.tile_size == SIZE and cfg.final_meta()["max_tiles"] == 4
    doc = sft.conversation(recs[1], cfg, tok, str(d))  # 128 x 64: 2 tiles + the thumbnail
    assert doc.ids.count(M.IMAGE_ID) == len(doc.images) == 3
    want = M.tile_image(M.load_image(str(d / "img" / "1.jpg")), SIZE, 4)
    assert [np.asarray(M.load_image(b)).tolist() for _, b in doc.images] == [np.asarray(t).tolist() for t in want]
    assert "user\n<tile_1>[img]<tile_2>[img]<tile_global_thumbnail>[img]\nWhat" in layout(tok, doc.ids)
    plain = sft.conversation(recs[1], config(init, tmp_path / "o", "--seq-len", "1024"), tok, str(d))
    sup = [t for t, y in zip(doc.ids, doc.labels) if y != M.IGNORE]
    assert sup == [t for t, y in zip(plain.ids, plain.labels) if y != M.IGNORE] and sup  # replies only
    two = sft.conversation(recs[5], cfg, tok, str(d))  # 128 x 128 (4 + 1) then 128 x 64 (2 + 1)
    assert two.ids.count(M.IMAGE_ID) == len(two.images) == 8
    # truncation counts every tile: room for the first turn exactly, not for the second
    ids, labels = M.chat_tokens(tok, recs[1]["conversations"][:2])
    first = len(M.expand_tiles(tok, ids, [3], labels)[0])
    seq = first + 3 * (16 - 1)
    cut = sft.conversation(recs[1], config(init, tmp_path / "o", "--max-tiles", "4", "--tile-tokens", "16",
                                           "--seq-len", str(seq)), tok, str(d))
    assert cut.truncated and len(cut.ids) == first and len(cut.images) == 3
    assert sft.conversation(recs[1], config(init, tmp_path / "o", "--max-tiles", "4", "--tile-tokens", "16",
                                            "--seq-len", str(seq - 1)), tok, str(d)) == "too_long"


def test_packed_rows_with_tiles_equal_unpacked(tok, init, sources, tmp_path):
    d, _ = sources
    cfgs = {}
    for mode in ("--pack", "--no-pack"):
        cfgs[mode] = cfg = config(init, tmp_path / mode, "--data", str(d / "sft.json"), "--max-tiles", "4",
                                  "--tile-tokens", "16", "--seq-len", "512", mode)
        stats = sft.prepare_rows(cfg, os.path.join(init, "tokenizer.json"))
        assert stats["used"] == 24 and stats["key"]["max_tiles"] == 4
    rows = sorted(pack.read_packed(cfgs["--pack"].prepared), key=lambda r: -len(r["doc_lengths"]))[:3]
    assert sum(len(r["doc_lengths"]) for r in rows) >= 5
    plain = {tuple(u): row for row in pack.read_packed(cfgs["--no-pack"].prepared) for u in row["uids"]}
    singles = [plain[tuple(u)] for r in rows for u in r["uids"]]
    net = M.VLM.from_pretrained(init, image_tokens=16)
    net.vision.requires_grad_(False)

    def step(rows, cfg):
        b = train.make_batch(rows, cfg, SIZE, tok.pad_id)
        net.zero_grad()
        loss = net(b["input_ids"], M.normalize_pixels(b["pixels"]), b["doc_lens"], b["targets"]) / b["n_sup"]
        loss.backward()
        return b, loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    bp, lp, gp = step(rows, cfgs["--pack"])
    bu, lu, gu = step(singles, cfgs["--no-pack"])
    assert bp["n_images"] == bu["n_images"] == sum(r["input_ids"].tolist().count(M.IMAGE_ID) for r in rows) > 10
    assert bp["n_sup"] == bu["n_sup"] > 0 and bp["n_tokens"] == bu["n_tokens"]
    assert abs(lp - lu) <= 1e-5 * abs(lu)
    assert max((gp[k] - gu[k]).abs().max().item() for k in gp) <= 1e-5 * max(gu[k].abs().max().item() for k in gu)


# -----------------------------------------------------------------------------------------------------------------
# Saved tiling: eval uses it, export refuses it


def tiled_model(tok, toy_world, d, max_tiles=4):
    net = M.VLM(M.preset("tiny", vocab_size=-(-len(tok) // 64) * 64)).init_weights(3)
    net.config.max_tiles = max_tiles  # as sft.py --max-tiles records it
    net.save_pretrained(d)
    shutil.copyfile(os.path.join(toy_world, "tokenizer.json"), os.path.join(d, "tokenizer.json"))
    return d


def test_eval_tiles_with_the_saved_setting_and_export_refuses(tok, toy_world, tmp_path, monkeypatch):
    model = tiled_model(tok, toy_world, str(tmp_path / "m"))
    assert W.load_vlm(model).config.max_tiles == 4
    with pytest.raises(ValueError, match="tiles"):
        W.export_hf(model, str(tmp_path / "hf"))
    data = tmp_path / "data"
    data.mkdir()
    imgs = [base64.b64encode(image_bytes(w, h, k)).decode() for k, (w, h) in enumerate([(128, 64), (128, 128)])]
    with open(data / "TextVQA_VAL.tsv", "w") as f:
        f.write("index\timage\tquestion\tanswer\n" + "".join(f"{k}\t{im}\tWhat?\tcat\n" for k, im in enumerate(imgs)))
    seen = []

    def fake_generate(self, prompts, pixel_values=None, *a, **k):
        seen.append((prompts, pixel_values))
        return [[tok.eos_id] for _ in prompts]
    monkeypatch.setattr(M.VLM, "generate", fake_generate)
    for flag, n in (([], {3, 5}), (["--max-tiles", "1"], {1})):
        seen.clear()
        E.main(["--model", model, "--data", str(data), "--out", str(tmp_path / "e"), "--bench", "textvqa",
                "--workers", "0", "--style", "paper", *flag])
        assert {p.count(M.IMAGE_ID) for ps, _ in seen for p in ps} == n
        assert sum(pv.shape[0] for _, pv in seen) == sum(p.count(M.IMAGE_ID) for ps, _ in seen for p in ps)
        shutil.rmtree(tmp_path / "e")


def test_chat_tiles_like_generate(tok, toy_world, tmp_path):
    model = tiled_model(tok, toy_world, str(tmp_path / "m"))
    (tmp_path / "a.png").write_bytes(image_bytes(128, 64))
    text = E.main(["chat", "--model", model, "--image", str(tmp_path / "a.png"), "--max-new-tokens", "4", "Hi?"])
    net = M.load_vlm(model)
    tiles = M.tile_image(M.load_image(str(tmp_path / "a.png")), SIZE, 4)
    ids = M.chat_tokens(tok, [{"from": "human", "value": "<image>\nHi?"}], generation_prompt=True)[0]
    ids = M.expand_tiles(tok, ids, [len(tiles)])[0]
    pv = torch.stack([M.normalize_pixels(M.image_to_uint8(t, SIZE)) for t in tiles])
    assert text == tok.decode(net.generate([ids], pv, 4, stop_ids=[tok.eos_id])[0])


# -----------------------------------------------------------------------------------------------------------------
# The toy world's small print


def test_toy_text_size_sets_the_word_height():
    scene = {"bg": "white", "objects": [], "text": ["HOME", "black", "top", 0.5]}
    blank = np.asarray(toyworld.render({**scene, "text": None}, 256))

    def ink_rows(img):
        return np.flatnonzero((np.asarray(img) != blank).any(axis=(1, 2)))

    small, default = ink_rows(toyworld.render(scene, 256, text_size=0.05)), ink_rows(toyworld.render(scene, 256))
    assert 0.03 * 256 <= len(small) <= 0.06 * 256 and len(default) > 2.5 * len(small)
    with pytest.raises(ValueError, match="text_size"):
        toyworld.build("/nonexistent/never", text_size=0.7)
