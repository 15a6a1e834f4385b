"""The toy world: determinism, formats read back with plain readers, counts, ground truth, held-out evaluation."""
import ast
import base64
import collections
import csv
import glob
import hashlib
import io
import json
import os
import re
import subprocess
import sys
import tarfile

import numpy as np
import pytest
from PIL import Image

import model
import toyworld

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(seed=0, n_pool=30, n_sft=6, n_eval=8, image_size=64, text_size=0.0, wrong_share=0.1, shard_size=16)


def manifest(root):
    with open(os.path.join(root, "manifest.json")) as f:
        return json.load(f)


def config(root):
    return manifest(root)["config"]


def pool_members(root):
    """{key: {ext: bytes}} over all pool shards, read with the stdlib tarfile."""
    out = {}
    for path in sorted(glob.glob(os.path.join(root, "pool", "*.tar"))):
        with tarfile.open(path) as t:
            for m in t.getmembers():
                key, ext = m.name.split(".", 1)
                out.setdefault(key, {})[ext] = t.extractfile(m).read()
    return out


def files_under(root):
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, fs in os.walk(root) for f in fs)


def pixels_hash(data):
    return hashlib.sha1(np.asarray(Image.open(io.BytesIO(data)).convert("RGB")).tobytes()).hexdigest()


def tsv(root, name):
    """An eval TSV read with the stdlib csv module, as eval.py and VLMEvalKit's pandas read it."""
    with open(os.path.join(root, "eval", name), newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def images_of(images):
    """The image paths of an SFT conversation: one path or a list."""
    return images if isinstance(images, list) else [images]


def broken_keys(m):
    return {key: kind for kind, keys in m["pool"]["broken"].items() for key in keys}


# -----------------------------------------------------------------------------------------------------------------
# Determinism and building


def test_same_seed_gives_byte_identical_files(toy_world, tmp_path):
    again = str(tmp_path / "again")
    toyworld.build(again, **config(toy_world))
    names = files_under(toy_world)
    assert names == files_under(again) and len(names) > 200
    for name in names:
        with open(os.path.join(toy_world, name), "rb") as a, open(os.path.join(again, name), "rb") as b:
            assert a.read() == b.read(), f"{name} differs between two builds with the same seed"


def test_another_seed_gives_another_world(tmp_path):
    toyworld.build(str(tmp_path / "s0"), **TINY)
    toyworld.build(str(tmp_path / "s1"), **{**TINY, "seed": 1})
    for name in ("pool/000000.tar", "sft/sft.json", "eval/POPE.tsv"):
        assert open(tmp_path / "s0" / name, "rb").read() != open(tmp_path / "s1" / name, "rb").read()


def test_ensure_builds_once_and_rebuilds_on_other_settings(tmp_path):
    root = str(tmp_path / "world")
    assert toyworld.ensure(root, **TINY) == root
    stamp = os.stat(os.path.join(root, "manifest.json")).st_mtime_ns
    assert toyworld.ensure(root, **TINY) == root
    assert os.stat(os.path.join(root, "manifest.json")).st_mtime_ns == stamp  # not rebuilt
    toyworld.ensure(root, **{**TINY, "seed": 3})
    assert manifest(root)["config"]["seed"] == 3
    assert os.listdir(tmp_path) == ["world"]  # no temp or old dirs left behind
    assert toyworld.default_root() == os.path.join(REPO, "cache", "toyworld")


def test_interrupted_build_never_looks_finished(tmp_path, monkeypatch):
    root = str(tmp_path / "world")
    toyworld.build(root, **TINY)
    before = open(os.path.join(root, "manifest.json")).read()

    def boom(*a, **k):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(toyworld, "train_tokenizer", boom)
    with pytest.raises(RuntimeError):
        toyworld.build(root, **{**TINY, "seed": 5})
    with pytest.raises(RuntimeError):
        toyworld.build(str(tmp_path / "fresh"), **TINY)
    assert sorted(os.listdir(tmp_path)) == ["world"]  # the old world survives; nothing half-written remains
    assert open(os.path.join(root, "manifest.json")).read() == before


def test_refuses_bad_settings_and_foreign_dirs(tmp_path):
    for bad in (dict(n_pool=0), dict(image_size=16), dict(wrong_share=1.0), dict(n_pool=8), dict(shard_size=0)):
        with pytest.raises(ValueError):
            toyworld.build(str(tmp_path / "w"), **{**TINY, **bad})
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(FileExistsError):
        toyworld.build(str(tmp_path / "mine"), **TINY)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


def test_384_px_world(tmp_path):
    root = str(tmp_path / "w")
    m = toyworld.build(root, **{**TINY, "image_size": 384})
    members = pool_members(root)
    key = next(k for k in members if k not in broken_keys(m))
    assert Image.open(io.BytesIO(members[key]["jpg"])).size == (384, 384)
    scene = {"bg": "white", "objects": [], "text": ["cat", "black", "top", 0.5]}
    ink = np.asarray(toyworld.render(scene, 384))[:128].min(axis=2) < 100  # the word is drawn, and scaled up
    assert ink.any() and np.ptp(np.nonzero(ink.any(axis=0))[0]) > 60


def test_command_line_and_samples(tmp_path):
    out = subprocess.run([sys.executable, "toyworld.py", "--out", str(tmp_path / "w"), "--n-pool", "30", "--n-sft",
                          "6", "--n-eval", "8", "--shard-size", "16", "--seed", "2"],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert manifest(str(tmp_path / "w"))["config"] == {**TINY, "seed": 2}
    toyworld.write_samples(str(tmp_path / "docs"), image_size=128, n_pool=200)
    pngs = sorted(glob.glob(str(tmp_path / "docs" / "*.png")))
    assert len(pngs) == 2 and all(Image.open(p).size == (128, 128) and os.path.getsize(p) < 10_000 for p in pngs)


# -----------------------------------------------------------------------------------------------------------------
# Pre-training pool


def test_pool_reads_back_with_webdataset(toy_world):
    import webdataset as wds

    m = manifest(toy_world)
    urls = sorted(glob.glob(os.path.join(toy_world, "pool", "*.tar")))
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == m["pool"]["samples"] == m["config"]["n_pool"]
    keys = [s["__key__"] for s in samples]
    assert keys == sorted(m["scenes"]["pool"]) and all(re.fullmatch(r"\d{9}", k) for k in keys)
    uids = set()
    broken = broken_keys(m)
    for s in samples:
        meta = json.loads(s["json"])
        assert meta["key"] == s["__key__"] and re.fullmatch(r"[0-9a-f]{32}", meta["uid"])
        uids.add(meta["uid"])
        kind = broken.get(s["__key__"])
        assert ("png" in s) == (kind == "png_alpha") and ("jpg" in s) != ("png" in s)
        assert ("txt" in s) == (kind != "missing_txt")
        if kind is None:
            img = model.load_image(s["jpg"], s["__key__"])
            assert img.size == (m["config"]["image_size"],) * 2 and s["txt"].decode().strip()
    assert len(uids) == len(samples)


def test_broken_records_are_broken_as_stated(toy_world):
    m, members = manifest(toy_world), pool_members(toy_world)
    tok = model.Tokenizer(toy_world)
    assert list(m["pool"]["broken"]) == list(toyworld.BROKEN_KINDS)
    for kind, keys in m["pool"]["broken"].items():
        assert keys, f"no {kind} record"
        for key in keys:
            rec = members[key]
            if kind == "truncated_jpeg":
                assert rec["jpg"][:2] == b"\xff\xd8"  # looks like a JPEG ...
                with pytest.raises(OSError):  # ... but does not decode
                    Image.open(io.BytesIO(rec["jpg"])).load()
            elif kind == "zero_byte_image":
                assert rec["jpg"] == b""
            elif kind == "empty_caption":
                assert rec["txt"] == b"" and model.load_image(rec["jpg"]).size == (m["config"]["image_size"],) * 2
            elif kind == "missing_txt":
                assert "txt" not in rec and "jpg" in rec and "json" in rec
            elif kind == "huge_caption":
                assert len(tok.encode(rec["txt"].decode())) > 4096
            elif kind == "cmyk_jpeg":
                assert Image.open(io.BytesIO(rec["jpg"])).mode == "CMYK"
                assert model.load_image(rec["jpg"]).mode == "RGB"
            elif kind == "png_alpha":
                img = Image.open(io.BytesIO(rec["png"]))
                assert img.format == "PNG" and img.mode == "RGBA"
                alpha = np.asarray(img)[..., 3]
                assert alpha.min() == 0 and alpha.max() == 255
                assert min(model.load_image(rec["png"]).getpixel((0, 0))) > 240  # transparent -> white background


def mentions(caption, scene):
    """How many of the scene's (colour, shape) kinds the caption names."""
    return sum(f"{c} {s}" in caption for c, s, _ in toyworld.groups(scene))


def test_wrong_captions_are_the_configured_share_and_really_wrong(toy_world):
    m, members = manifest(toy_world), pool_members(toy_world)
    wrong, broken = set(m["pool"]["wrong_caption"]), broken_keys(m)
    assert len(wrong) == round(m["config"]["wrong_share"] * m["config"]["n_pool"]) > 0 and not wrong & set(broken)
    for key, rec in members.items():
        if broken.get(key) in ("empty_caption", "missing_txt"):
            continue
        scene, cap = m["scenes"]["pool"][key], rec["txt"].decode()
        # a right caption names every kind in the image; a wrong one names none
        assert mentions(cap, scene) == (0 if key in wrong else len(toyworld.groups(scene))), (key, cap)
    for n, share in ((100, 0.0), (100, 0.25), (2001, 0.1), (20000, 0.33)):
        broken, wrong = toyworld.pool_noise(7, n, share)
        assert len(wrong) == round(share * n) and not wrong & set(broken)
        assert collections.Counter(broken.values()) == {k: max(1, min(3, n // 2000)) for k in toyworld.BROKEN_KINDS}


def test_images_show_their_scenes(toy_world):
    m, members = manifest(toy_world), pool_members(toy_world)
    broken, size = broken_keys(m), m["config"]["image_size"]
    checked = 0
    for key, scene in m["scenes"]["pool"].items():
        if key in broken:
            continue
        img = np.asarray(model.load_image(members[key]["jpg"]), dtype=float)
        for c, s, pos, _, x, y, r in scene["objects"]:  # the centre of every object has the object's colour ...
            px = img[int(y * size), int(x * size)]
            assert np.abs(px - toyworld.COLORS[c]).max() < 40, (key, c, s, px)
            assert pos == toyworld.POSITIONS[int(y * 3) * 3 + int(x * 3)]  # ... and lies in the named grid cell
            checked += 1
    assert checked > 1000


def test_caption_lengths_spread(toy_world):
    tok, members = model.Tokenizer(toy_world), pool_members(toy_world)
    lens = [len(tok.encode(r["txt"].decode())) for r in members.values() if "txt" in r and r["txt"]]
    lens = [n for n in lens if n < 4096]
    assert min(lens) <= 6 and max(lens) >= 50 and np.std(lens) > 8  # packing has to mix short and long samples


# -----------------------------------------------------------------------------------------------------------------
# Counts and held-out evaluation


def test_manifest_counts_match_disk(toy_world):
    m = manifest(toy_world)
    files = m["files"]
    shards = sorted(k for k in files if k.startswith("pool/"))
    assert shards == sorted(os.path.relpath(p, toy_world) for p in glob.glob(os.path.join(toy_world, "pool", "*")))
    assert len(shards) == m["pool"]["shards"] == -(-m["config"]["n_pool"] // m["config"]["shard_size"]) > 1
    for name in shards:
        with tarfile.open(os.path.join(toy_world, name)) as t:
            assert len({x.name.split(".")[0] for x in t.getmembers()}) == files[name]["samples"]
    assert sum(files[s]["samples"] for s in shards) == m["pool"]["samples"] == len(m["scenes"]["pool"])

    sft = json.load(open(os.path.join(toy_world, "sft", "sft.json")))
    with_image = [c for c in sft if "image" in c]
    assert files["sft/sft.json"] == {"conversations": len(sft), "with_image": len(with_image),
                                     "text_only": len(sft) - len(with_image),
                                     "multi_turn": sum(len(c["conversations"]) > 2 for c in sft),
                                     "two_images": sum(isinstance(c.get("image"), list) for c in sft)}
    on_disk = sorted(os.listdir(os.path.join(toy_world, "sft", "images")))
    assert files["sft/images"]["files"] == len(on_disk) == len(m["scenes"]["sft"])
    assert on_disk == sorted(os.path.basename(p) for c in with_image for p in images_of(c["image"]))

    n = m["config"]["n_eval"]
    rows = tsv(toy_world, "MMBench_DEV_EN.tsv")
    assert files["eval/MMBench_DEV_EN.tsv"] == {"questions": len({int(r["index"]) % 1_000_000 for r in rows}),
                                                "rows": len(rows)}
    assert files["eval/MMBench_DEV_EN.tsv"]["questions"] == n
    pope = tsv(toy_world, "POPE.tsv")
    asked = collections.Counter(r["answer"] for r in pope for _ in r["category"].split(","))
    assert files["eval/POPE.tsv"] == {"questions": n, "rows": len(pope), "yes": asked["Yes"], "no": asked["No"],
                                      "images": sum(len(r["image"]) > 64 for r in pope)}
    assert asked["Yes"] + asked["No"] == n
    for name in ("TextVQA_VAL.tsv", "MUIRBench.tsv"):
        assert files[f"eval/{name}"] == {"questions": n} and len(tsv(toy_world, name)) == n
    assert files["tokenizer.json"]["vocab_size"] == len(model.Tokenizer(toy_world))

    expected = {"manifest.json", "tokenizer.json", "sft/sft.json", *shards, *(f"eval/{x}" for x in EVAL_FILES),
                *(f"sft/{p}" for c in with_image for p in images_of(c["image"]))}
    assert set(files_under(toy_world)) == expected  # nothing on disk that the manifest does not account for


EVAL_FILES = ("MMBench_DEV_EN.tsv", "POPE.tsv", "TextVQA_VAL.tsv", "MUIRBench.tsv")


def eval_images(root):
    """Pixel hashes of every evaluation image (the base64 images of the TSVs; back-references skipped)."""
    out = set()
    for name in EVAL_FILES:
        for r in tsv(root, name):
            cell = r["image"]
            for data in ast.literal_eval(cell) if cell.startswith("[") else [cell] if len(cell) > 64 else []:
                out.add(pixels_hash(base64.b64decode(data)))
    return out


def test_eval_scenes_never_appear_in_training(toy_world):
    m = manifest(toy_world)
    train = [*m["scenes"]["pool"].values(), *m["scenes"]["sft"].values()]
    held_out = list(m["scenes"]["eval"].values())
    n = m["config"]["n_eval"]
    assert len(held_out) == n + m["files"]["eval/POPE.tsv"]["images"] + n + 2 * n  # MMBench, POPE, TextVQA, MUIR
    assert not any(toyworld.is_eval(s) for s in train) and all(toyworld.is_eval(s) for s in held_out)
    assert not {toyworld.signature(s) for s in train} & {toyworld.signature(s) for s in held_out}
    # and no evaluation image is pixel-identical to a training image, so no (image, question) pair is either
    members, broken = pool_members(toy_world), broken_keys(m)
    seen = {pixels_hash(r.get("jpg") or r["png"]) for k, r in members.items()
            if broken.get(k) not in ("truncated_jpeg", "zero_byte_image")}
    seen |= {pixels_hash(open(p, "rb").read()) for p in glob.glob(os.path.join(toy_world, "sft", "images", "*"))}
    shown = eval_images(toy_world)
    assert len(seen) > 700 and len(shown) > 200 and not seen & shown


# -----------------------------------------------------------------------------------------------------------------
# SFT and evaluation formats


def test_sft_is_llava_format_and_true_to_the_images(toy_world):
    m, tok = manifest(toy_world), model.Tokenizer(toy_world)
    sft = json.load(open(os.path.join(toy_world, "sft", "sft.json")))
    asked = collections.Counter()
    for conv in sft:
        turns = conv["conversations"]
        assert len(turns) % 2 == 0 and [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert all(t["value"].strip() for t in turns)
        images = images_of(conv.get("image", []))
        assert sum(t["value"].count("<image>") for t in turns) == turns[0]["value"].count("<image>") == len(images)
        assert all(os.path.isfile(os.path.join(toy_world, "sft", p)) for p in images)
        ids, labels = model.chat_tokens(tok, turns)
        assert sum(x == model.IMAGE_ID for x in ids) == len(images) and any(x != model.IGNORE for x in labels)
        if len(images) == 2:  # two training scenes and a question that needs both, answered right
            a, b = (m["scenes"]["sft"][os.path.basename(p)[:-4]] for p in images)
            q, ans = turns[0]["value"], turns[1]["value"]
            asked["two"] += 1
            kind = re.search(r"shows an? (\w+) (\w+)\?", q)
            want = "AB"[len(b["objects"]) > len(a["objects"])] if kind is None else \
                "AB"[any(o[:2] == list(kind.groups()) for o in b["objects"])]
            assert ans in (want, f"The {('first', 'second')['AB'.index(want)]} image.")
            continue
        scene = m["scenes"]["sft"].get(conv["id"])
        for q, a in zip(turns[::2], turns[1::2]):
            q, a = q["value"].replace("<image>", "").strip(), a["value"]
            for kind, pattern in (("color", r"What color"), ("shape", r"What shape"), ("count", r"How many"),
                                  ("position", r"Where is"), ("text", r"written|text say"), ("exist", r"Is there"),
                                  ("mc", r"option's letter"), ("short", r"single word")):
                asked[kind] += bool(re.search(pattern, q))
            got = re.fullmatch(r"How many (\w+) (\w+)s are there\?\nAnswer the question using a single word or "
                               r"phrase\.", q)
            if got:  # short answers agree with the scene
                assert int(a) == sum(o[:2] == [got[1], got[2]] for o in scene["objects"])
    assert all(asked[k] > 5 for k in ("color", "shape", "count", "position", "text", "exist", "mc", "short", "two")), \
        asked
    assert m["files"]["sft/sft.json"]["text_only"] >= 1 and m["files"]["sft/sft.json"]["multi_turn"] > 20


def test_mmbench_tsv_has_circular_copies_and_right_answers(toy_world):
    m = manifest(toy_world)
    rows = tsv(toy_world, "MMBench_DEV_EN.tsv")
    assert list(rows[0]) == ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image", "split"]
    by_q = collections.defaultdict(list)
    for r in rows:
        by_q[int(r["index"]) % 1_000_000].append(r)
    assert sorted(by_q) == list(range(m["config"]["n_eval"]))
    assert {r["category"] for r in rows} == set(toyworld.MMBENCH)
    for g, copies in by_q.items():
        n_opts = sum(bool(copies[0][x]) for x in "ABCD")
        assert n_opts in (2, 4) and sorted(int(r["index"]) for r in copies) == [g + k * 1_000_000 for k in
                                                                                 range(n_opts)]
        assert len({r["question"] for r in copies}) == 1
        assert [r["image"] for r in copies[1:]] == [str(g)] * (n_opts - 1)  # back-references to the original's image
        assert len({r[r["answer"]] for r in copies}) == 1  # the same answer text ...
        assert len({r["answer"] for r in copies}) == n_opts  # ... under every letter in turn
        assert Image.open(io.BytesIO(base64.b64decode(copies[0]["image"]))).size == (m["config"]["image_size"],) * 2
        scene, r = m["scenes"]["eval"][f"mmbench/{g}"], copies[0]
        got = re.fullmatch(r"How many (\w+) (\w+)s are there\?", r["question"])
        if got:
            assert int(r[r["answer"]]) == sum(o[:2] == [got[1], got[2]] for o in scene["objects"])
        if r["category"] == "ocr":
            assert r[r["answer"]] == scene["text"][0]
        got = re.fullmatch(r"Where is the (\w+) (\w+)\?", r["question"])
        if got:
            assert [r[r["answer"]]] == [o[2] for o in scene["objects"] if o[:2] == [got[1], got[2]]]


def test_pope_is_balanced_and_true(toy_world):
    m = manifest(toy_world)
    pope, n = tsv(toy_world, "POPE.tsv"), m["config"]["n_eval"]
    assert [int(r["index"]) for r in pope] == list(range(len(pope))) and len(pope) < n  # some rows serve 2-3 ways
    assert len({(r["image"] if len(r["image"]) <= 64 else r["index"], r["question"]) for r in pope}) == len(pope)
    count = collections.Counter((c, r["answer"]) for r in pope for c in r["category"].split(","))
    for cat in ("random", "popular", "adversarial"):
        assert abs(count[(cat, "Yes")] - count[(cat, "No")]) <= 1 and count[(cat, "Yes")] >= n // 6
    for r in pope:
        c, s = re.fullmatch(r"Is there an? (\w+) (\w+) in the image\?", r["question"]).groups()
        scene = m["scenes"]["eval"][f"pope/{r['image'] if len(r['image']) <= 64 else r['index']}"]
        assert r["answer"] == ("Yes" if any(o[:2] == [c, s] for o in scene["objects"]) else "No")
        if len(r["image"]) > 64:
            assert pixels_hash(base64.b64decode(r["image"])) == pixels_hash(toyworld.encode(toyworld.render(
                scene, m["config"]["image_size"])))


def test_textvqa_has_ten_answers_agreeing_with_the_image(toy_world):
    m = manifest(toy_world)
    data = tsv(toy_world, "TextVQA_VAL.tsv")
    assert [int(r["index"]) for r in data] == list(range(m["config"]["n_eval"]))
    for r in data:
        answers = ast.literal_eval(r["answer"])
        assert len(answers) == 10 and all(isinstance(a, str) and a for a in answers)
        word = m["scenes"]["eval"][f"textvqa/{r['index']}"]["text"][0]
        assert collections.Counter(answers).most_common(1)[0][0] == word
        assert Image.open(io.BytesIO(base64.b64decode(r["image"]))).size == (m["config"]["image_size"],) * 2


def test_muirbench_needs_both_images_and_is_right(toy_world):
    m = manifest(toy_world)
    rows = tsv(toy_world, "MUIRBench.tsv")
    assert list(rows[0]) == ["index", "question", "A", "B", "answer", "category", "image"]
    assert {r["category"] for r in rows} == {"counting", "existence"} and {r["answer"] for r in rows} == {"A", "B"}
    for r in rows:
        assert r["question"].count("<image>") == 2 and (r["A"], r["B"]) == toyworld.TWO_IMAGES
        images = ast.literal_eval(r["image"])
        a, b = (m["scenes"]["eval"][f"muirbench/{r['index']}/{k}"] for k in range(2))
        assert [pixels_hash(base64.b64decode(x)) for x in images] == [
            pixels_hash(toyworld.encode(toyworld.render(s, m["config"]["image_size"]))) for s in (a, b)]
        if r["category"] == "counting":
            assert len(a["objects"]) != len(b["objects"])
            assert r["answer"] == "AB"[len(b["objects"]) > len(a["objects"])]
        else:
            c, s = re.search(r"shows an? (\w+) (\w+)\?", r["question"]).groups()
            has = [any(o[:2] == [c, s] for o in x["objects"]) for x in (a, b)]
            assert sum(has) == 1 and r["answer"] == "AB"[has[1]]


# -----------------------------------------------------------------------------------------------------------------
# Tokenizer


def test_tokenizer_is_shaped_like_qwen(toy_world):
    tok = model.Tokenizer(os.path.join(toy_world, "tokenizer.json"))
    cfg = json.load(open(os.path.join(toy_world, "tokenizer.json")))
    n_bpe = len(cfg["model"]["vocab"])
    assert 500 <= n_bpe <= 4096 and len(tok) == n_bpe + 24  # ~1.8k for the default world, less for this small one
    added = [(t["id"], t["content"], t["special"]) for t in cfg["added_tokens"]]
    assert added == [(n_bpe + k, t, special) for k, (t, special) in
                     enumerate(toyworld.QWEN_ADDED + [(t, True) for t in toyworld.PAPER_ADDED])]
    assert (tok.pad_id, tok.im_start_id, tok.eos_id, tok.eoc_id, tok.bos_id) == \
        (n_bpe, n_bpe + 1, n_bpe + 2, n_bpe + 22, n_bpe + 23)
    assert cfg["normalizer"]["type"] == "NFC" and cfg["decoder"]["type"] == "ByteLevel"
    split, byte_level = cfg["pre_tokenizer"]["pretokenizers"]
    assert split["pattern"]["Regex"] == toyworld.QWEN_PATTERN and split["behavior"] == "Isolated"
    assert byte_level["type"] == "ByteLevel" and not byte_level["add_prefix_space"] and not byte_level["use_regex"]
    for text in ("two red stars.", 'A sign that says "CAFE", with 3 pink circles.', "naïve café ✓ 12345\n\tx"):
        assert tok.decode(tok.encode(text)) == text
    assert tok.encode("Is there a red circle in the image?") == \
        [tok.tok.token_to_id(t) for t in ["Is", "Ġthere", "Ġa", "Ġred", "Ġcircle", "Ġin", "Ġthe", "Ġimage", "?"]]


def test_train_tokenizer_on_other_texts():
    tok = toyworld.train_tokenizer(["hello world", "hello there", "world of shapes"] * 10, 300)
    assert tok.get_vocab_size(with_added_tokens=False) < 300
    assert tok.token_to_id("<|endoftext|>") == tok.get_vocab_size(with_added_tokens=False)
    assert tok.token_to_id("<s>") == tok.get_vocab_size(with_added_tokens=True) - 1
    assert tok.decode(tok.encode("hello shapes").ids) == "hello shapes"
