"""filter.py: SigLIP scores against transformers, one line per sample on broken input, 2 ranks == 1 process, the
MLM-Filter prompt and parse, select's set algebra, reshard's exactness and kill-and-rerun."""
import hashlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

import filter as FL
import model as M
import pack
import weights as W

transformers = pytest.importorskip("transformers")
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORDS = "a red circle blue square green triangle on white background two three stars the word cat dog photo".split()


def jpeg(rng, w=40, h=30) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def write_shard(path, samples):
    """samples: (key, {ext: bytes}) -> a tar with fixed member metadata."""
    with open(path, "wb") as f:
        f.write(b"".join(pack.tar_member(f"{k}.{e}", d) for k, m in samples for e, d in m.items()) + bytes(1024))


def pair(rng, key, caption, uid=None, status="success"):
    uid = uid or hashlib.md5(key.encode()).hexdigest()
    return key, {"jpg": jpeg(rng, int(rng.integers(20, 60)), int(rng.integers(20, 60))), "txt": caption.encode(),
                 "json": json.dumps({"key": key, "uid": uid, "status": status}).encode()}


CAPTIONS = ["A Red circle!", "  two   blue,squares. ", "x</s>y", "a </s> b", "\u2581cat \u2581dog", "caf\u00e9 \u2603",
            "!!!", "red " * 80, "tab\tnew\nline", "The WORD: cat; dog."]


@pytest.fixture(scope="module")
def siglip_dir(tmp_path_factory):
    """A tiny random SigLIP in HF layout, written by transformers, with a SentencePiece tokenizer trained here."""
    import sentencepiece as spm
    d = tmp_path_factory.mktemp("siglip")
    rng = random.Random(0)
    sents = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(300)]
    spm.SentencePieceTrainer.train(sentence_iterator=iter(sents), model_prefix=str(d / "sp"), vocab_size=60,
                                   hard_vocab_limit=False, minloglevel=2)
    # as the official converter makes it: no attention_mask, since SigLIP was trained without one on padded text
    tok = transformers.SiglipTokenizer(vocab_file=str(d / "sp.model"), model_input_names=["input_ids"])
    torch.manual_seed(0)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=32,
              patch_size=8)
    tc = dict(vocab_size=tok.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
              num_attention_heads=4, max_position_embeddings=64)
    ref = transformers.SiglipModel(transformers.SiglipConfig(text_config=tc, vision_config=vc)).eval()
    with torch.no_grad():  # HF's init leaves biases, norms and the probe flat: make every tensor count
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ref.save_pretrained(d / "model")
    tok.save_pretrained(d / "model")
    return str(d / "model")


def hf_scores(model_dir, images, captions, tokenizer):
    ref = transformers.SiglipModel.from_pretrained(model_dir).eval()
    size = ref.config.vision_config.image_size
    proc = transformers.SiglipProcessor(transformers.SiglipImageProcessor(size={"height": size, "width": size}),
                                        tokenizer)
    x = proc(text=captions, images=[Image.open(io.BytesIO(b)).convert("RGB") for b in images], padding="max_length",
             max_length=64, truncation=True, return_tensors="pt")
    with torch.no_grad():
        out = ref(**x)
    cos = (torch.nn.functional.normalize(out.image_embeds, dim=-1) *
           torch.nn.functional.normalize(out.text_embeds, dim=-1)).sum(-1)
    return x["input_ids"], cos, torch.sigmoid(out.logits_per_image.diagonal())


def read_lines(d):
    return {f: [json.loads(s) for s in open(os.path.join(d, f))] for f in sorted(os.listdir(d)) if f.endswith(".jsonl")}


def test_score_matches_transformers(tmp_path, siglip_dir):
    rng = np.random.default_rng(0)
    samples = [pair(rng, f"{k:04d}", c) for k, c in enumerate(CAPTIONS)]
    write_shard(tmp_path / "a.tar", samples)
    FL.main(["score", "--input", str(tmp_path / "a.tar"), "--model", siglip_dir, "--out", str(tmp_path / "s"),
             "--batch-size", "3", "--workers", "0"])
    lines = read_lines(tmp_path / "s")["a.jsonl"]
    tok = transformers.SiglipTokenizer.from_pretrained(siglip_dir)
    ids, cos, prob = hf_scores(siglip_dir, [m["jpg"] for _, m in samples], CAPTIONS, tok)
    ours = FL.SiglipTokenizer(siglip_dir)
    assert [ours.encode(c) for c in CAPTIONS] == ids.tolist()  # the processor's ids exactly, pads included
    assert [x["key"] for x in lines] == [k for k, _ in samples] and all(x["error"] is None for x in lines)
    assert np.abs(np.array([x["score"] for x in lines]) - cos.numpy()).max() < 1e-5
    assert np.abs(np.array([x["prob"] for x in lines]) - prob.numpy()).max() < 1e-5
    assert cos.std() > 1e-3  # the pairs really score differently


def test_one_line_per_sample_on_broken_input(tmp_path, siglip_dir):
    rng = np.random.default_rng(1)
    good = [pair(rng, f"g{k}", "a red circle") for k in range(5)]
    broken = {"trunc": ("jpg", jpeg(rng)[:200]), "zero": ("jpg", b""), "garbage": ("jpg", b"not an image" * 9)}
    samples = good[:2] + [(k, {**good[0][1], e: d}) for k, (e, d) in broken.items()]
    samples += [("nocap", {e: d for e, d in good[1][1].items() if e != "txt"}),
                ("emptycap", {**good[1][1], "txt": b"  \n"}), ("noimg", {"txt": b"a cat"})] + good[2:]
    write_shard(tmp_path / "a.tar", samples)
    write_shard(tmp_path / "b.tar", good)
    data = open(tmp_path / "b.tar", "rb").read()
    open(tmp_path / "b.tar", "wb").write(data[: len(data) // 2])  # cut in the middle of a sample
    FL.main(["score", "--input", str(tmp_path), "--model", siglip_dir, "--out", str(tmp_path / "s"),
             "--batch-size", "4", "--workers", "2"])
    a, b = read_lines(tmp_path / "s").values()
    assert [x["key"] for x in a] == [k for k, _ in samples]
    errors = {x["key"]: x["error"] for x in a if x["error"]}
    assert set(errors) == {"trunc", "zero", "garbage", "nocap", "emptycap", "noimg"}
    assert all(errors[k].startswith("broken image") for k in broken)
    assert (errors["nocap"], errors["emptycap"], errors["noimg"]) == ("missing caption", "empty caption",
                                                                      "missing image")
    assert all((x["score"] is None) == (x["error"] is not None) for x in a + b)
    read = [k for k, m in pack.read_tar(str(tmp_path / "b.tar"))]
    assert [x["key"] for x in b] == read and b[-1]["error"].startswith("broken tar") and len(b) < len(good)


def test_two_ranks_equal_one_process(tmp_path, siglip_dir):
    rng = np.random.default_rng(2)
    for s in range(3):
        write_shard(tmp_path / f"{s}.tar", [pair(rng, f"{s}{k}", " ".join(rng.choice(WORDS, 6))) for k in range(5)])
    args = ["score", "--input", str(tmp_path / "*.tar"), "--model", siglip_dir, "--batch-size", "2", "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "filter.py", *args, "--out", str(tmp_path / "one")], cwd=REPO, env=env, check=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "filter.py", *args, "--out",
                    str(tmp_path / "two")], cwd=REPO, env=env, check=True)
    for f in ("0.jsonl", "1.jsonl", "2.jsonl"):
        assert open(tmp_path / "one" / f, "rb").read() == open(tmp_path / "two" / f, "rb").read()


def test_train_writes_hf_layout_that_scores_like_transformers(tmp_path, toy_world):
    out = str(tmp_path / "sig")
    FL.main(["train", "--input", os.path.join(toy_world, "pool", "000000.tar"), "--tokenizer",
             os.path.join(toy_world, "tokenizer.json"), "--out", out, "--steps", "3", "--batch-size", "16",
             "--width", "32", "--layers", "1"])
    ref, info = transformers.SiglipModel.from_pretrained(out, output_loading_info=True)
    assert not any(info.values())  # every tensor under its HF name, nothing missing
    FL.main(["score", "--input", os.path.join(toy_world, "pool", "000001.tar"), "--model", out, "--out",
             str(tmp_path / "s"), "--workers", "0"])
    lines = [x for x in read_lines(tmp_path / "s")["000001.jsonl"] if x["error"] is None][:20]
    members = {k: m for k, m in pack.read_tar(os.path.join(toy_world, "pool", "000001.tar"))}
    images = [next(m[e][0] for e in ("jpg", "png") if e in m) for m in (members[x["key"]] for x in lines)]
    captions = [members[x["key"]]["txt"][0].decode() for x in lines]
    tok = transformers.PreTrainedTokenizerFast(tokenizer_file=os.path.join(out, "tokenizer.json"),
                                               pad_token="<|endoftext|>", model_input_names=["input_ids"])
    _, cos, prob = hf_scores(out, images, captions, tok)
    assert np.abs(np.array([x["score"] for x in lines]) - cos.numpy()).max() < 1e-5
    assert np.abs(np.array([x["prob"] for x in lines]) - prob.numpy()).max() < 1e-5


# -----------------------------------------------------------------------------------------------------------------
# MLM-Filter


def test_parse_score_rule():
    assert [FL.parse_score(s) for s in ("85\nThe caption...", "8", "x", "99,", "7;", "")] == [85, 8, None, 99, 7, None]


def test_mlm_prompt_is_the_reference_string(toy_world):
    # sha256 of formats.md §3.4's full string with §3.5's v2 template and each criterion, caption "a red circle"
    for metric, sha in PROMPT_SHA256.items():
        assert hashlib.sha256(FL.mlm_prompt("a red circle", metric).encode()).hexdigest() == sha, metric
    p = FL.mlm_prompt("a red circle", "semantic_understanding")
    assert p.startswith("<|im_start|>system\nYou are a helpful assistant<|im_end|><|im_start|>user\n<image>\nText "
                        "Caption: a red circle\n\nEvaluate the given") and p.endswith(
        "avoiding any potential bias.<|im_end|><|im_start|>assistant\n")
    import tokenizers
    path = os.path.join(toy_world, "tokenizer.json")
    hf = transformers.PreTrainedTokenizerFast(tokenizer_file=path)
    for metric in FL.MLM_CRITERIA:
        a, b = FL.mlm_prompt("Two <|im_end|> stars, 8", metric).split("<image>")
        want = hf(a).input_ids + [M.IMAGE_ID] + hf(b).input_ids + [hf(" ").input_ids[-1]]
        assert FL.mlm_ids(tokenizers.Tokenizer.from_file(path), "Two <|im_end|> stars, 8", metric) == want


PROMPT_SHA256 = {
    "image_text_matching": "58769dd37443be2d85fb04e1630b74df0d3c98dbdcfe8a5a1552d52b5284f47c",
    "object_detail_fulfillment": "d2375e2094ade2cdc9ea533b2229572c641a6c86af7e5629b871d001c989da8a",
    "caption_text_quality": "69227543442770e8baa4dd7a8bfa8ee2e8ca8ee1179c84d47a29fc8df7a790ba",
    "semantic_understanding": "d6d3a8161b03cdc58186b9faf8cd13dfcb75449e805bf0f40edb8878a1f99be8",
}


def tiny_judge(toy_world, out_dir, released: bool):
    tok = M.Tokenizer(os.path.join(toy_world, "tokenizer.json"))
    c = M.preset("tiny", vocab_size=len(tok))
    c.vision.act, c.feature_layer = "gelu_tanh", -1  # HF SigLIP's GELU and its last block, as the judge runs it
    vlm = M.VLM(c).init_weights(seed=3).eval()
    if released:
        from checkpoints import write_llava_qwen  # issue 8's writer of the released llava_qwen layout
        write_llava_qwen(out_dir, vlm, os.path.join(toy_world, "tokenizer.json"))
    else:
        vlm.save_pretrained(out_dir)
        import shutil
        shutil.copy(os.path.join(toy_world, "tokenizer.json"), os.path.join(out_dir, "tokenizer.json"))
    return out_dir


@pytest.mark.parametrize("released", [False, True])
def test_mlm_scores_a_shard(tmp_path, toy_world, released):
    if released:
        try:
            from checkpoints import write_llava_qwen  # noqa: F401
        except ImportError:
            pytest.skip("needs tests/checkpoints.write_llava_qwen and weights.load_vlm for llava_qwen (issue 8)")
    judge_dir = tiny_judge(toy_world, str(tmp_path / "judge"), released)
    shard = os.path.join(toy_world, "pool", "000001.tar")
    FL.main(["mlm", "--input", shard, "--model", judge_dir, "--out", str(tmp_path / "m"), "--batch-size", "8",
             "--workers", "0", "--metric", "image_text_matching"])
    lines = read_lines(tmp_path / "m")["000001.jsonl"]
    assert [x["key"] for x in lines] == [k for k, _ in pack.read_tar(shard)]
    judge = W.load_vlm(judge_dir).eval()
    import tokenizers
    tok = tokenizers.Tokenizer.from_file(judge.tokenizer_path)
    members = dict(pack.read_tar(shard))
    for x in [x for x in lines if x["error"] is None][:6]:  # one at a time: no padding at all
        m = members[x["key"]]
        px = M.preprocess(next(m[e][0] for e in ("jpg", "png") if e in m), judge.config.vision.image_size)
        stop = [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]
        new = judge.generate([FL.mlm_ids(tok, m["txt"][0].decode(), "image_text_matching")], px[None],
                             max_new_tokens=2, stop_ids=stop)
        assert x["raw"] == tok.decode(new[0], skip_special_tokens=True)
        assert x["score"] == FL.parse_score(x["raw"])
    assert all(x["raw"] is None and x["score"] is None for x in lines if x["error"])


# -----------------------------------------------------------------------------------------------------------------
# select and reshard


def uid_hex(n: int) -> str:
    return f"{n:032x}"


def test_select_union_intersect_top_fraction(tmp_path):
    u = lambda *ns: np.array([divmod(n, 2**64) for n in ns], dtype=FL.UID)  # noqa: E731
    big = 2**100 + 5
    np.save(tmp_path / "a.npy", u(7, 3, 3, big, 1))  # unsorted, with a duplicate
    np.save(tmp_path / "b.npy", u(3, big, 9, 9))
    os.makedirs(tmp_path / "s")
    lines = [dict(key=f"k{n}", uid=uid_hex(n), score=float(n), status="success", error=None) for n in range(10, 20)]
    lines[0]["status"] = "failed_to_download"
    lines += [dict(key="e", uid=uid_hex(99), score=None, status="success", error="broken image: x")]
    with open(tmp_path / "s" / "x.jsonl", "w") as f:
        f.writelines(json.dumps(x) + "\n" for x in lines)

    def run(*args):
        out = str(tmp_path / "keep.npy")
        summary = FL.main(["select", *args, "--out", out])
        got = np.load(out)
        assert got.dtype == FL.UID and (np.sort(got) == got).all() and len(np.unique(got)) == len(got)
        return [a * 2**64 + b for a, b in got.tolist()], summary

    assert run("--uids", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--union")[0] == [1, 3, 7, 9, big]
    assert run("--uids", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--intersect")[0] == [3, big]
    assert run("--scores", str(tmp_path / "s:15"))[0] == [15, 16, 17, 18, 19]
    assert run("--scores", str(tmp_path / "s"), "--top-fraction", "0.3")[0] == [17, 18, 19]  # 3 of the 10 scored
    assert run("--scores", str(tmp_path / "s"), "--status", "success")[0] == list(range(11, 20))  # no error line
    got, summary = run("--scores", str(tmp_path / "s:12.5"), "--uids", str(tmp_path / "b.npy"), "--union")
    assert got == [3, 9, 13, 14, 15, 16, 17, 18, 19, big] and summary["intersection"] == 0
    with pytest.raises(SystemExit):
        FL.main(["select", "--uids", str(tmp_path / "a.npy"), str(tmp_path / "b.npy"), "--out", "x.npy"])


def reshard_inputs(tmp_path, n_per=30):
    """Two input dirs whose shards share file names and keys (a clash), some samples without a uid."""
    rng, samples = np.random.default_rng(3), {}
    for d in ("x", "y"):
        os.makedirs(tmp_path / d)
        for s in range(2):
            shard = [pair(rng, f"{k:03d}", f"caption {d}{s}{k}", uid=hashlib.md5(f"{d}{s}{k}".encode()).hexdigest())
                     for k in range(n_per)]
            shard[5] = (shard[5][0], {e: v for e, v in shard[5][1].items() if e != "json"})  # no uid: an error
            write_shard(tmp_path / d / f"{s:05d}.tar", shard)
            samples.update({(d, s, k): m for k, m in shard})
    return samples


def test_reshard_exact(tmp_path):
    samples = reshard_inputs(tmp_path)
    uids = [json.loads(m["json"])["uid"] for m in samples.values() if "json" in m]
    chosen = sorted(random.Random(0).sample(uids, 70)) + [uid_hex(12345)]  # one uid that is in no shard
    np.save(tmp_path / "keep.npy", np.array([divmod(int(h, 16), 2**64) for h in chosen + chosen[:5]], FL.UID))
    out = tmp_path / "out"
    total = FL.main(["reshard", "--input", str(tmp_path / "x"), str(tmp_path / "y"), "--uids",
                     str(tmp_path / "keep.npy"), "--out", str(out), "--shard-size", "8", "--workers", "2"])
    assert total["seen"] == 120 and total["kept"] == 70 and total["errors"] == {"no_uid": 4}
    assert total["seen"] == total["kept"] + total["dropped"] + 4 and total["shards"] == 9
    got = {}
    for j in range(9):
        shard = list(pack.read_tar(str(out / f"{j:08d}.tar")))
        assert len(shard) == (8 if j < 8 else 6) and len({k for k, _ in shard}) == len(shard)
        assert json.load(open(out / f"{j:08d}_stats.json"))["samples"] == len(shard)
        got.update({json.loads(m["json"][0])["uid"]: {e: d for e, (d, _) in m.items()} for _, m in shard})
    want = {json.loads(m["json"])["uid"]: m for m in samples.values() if "json" in m and
            json.loads(m["json"])["uid"] in set(chosen)}
    assert got == want  # exactly the selected samples, each once, every member byte-identical
    # all in one shard: the inputs share their keys, so clashes are renamed (key_1, key_2, ...) and counted
    one = FL.main(["reshard", "--input", str(tmp_path / "x"), str(tmp_path / "y"), "--uids",
                   str(tmp_path / "keep.npy"), "--out", str(tmp_path / "one"), "--shard-size", "1000"])
    keys = [k for k, _ in pack.read_tar(str(tmp_path / "one" / "00000000.tar"))]
    assert len(keys) == len(set(keys)) == 70 and one["renamed"] == sum(k.count("_") for k in keys) > 0


def test_reshard_sigkill_then_rerun_gives_the_same_shards(tmp_path):
    samples = reshard_inputs(tmp_path, n_per=100)
    uids = [json.loads(m["json"])["uid"] for m in samples.values() if "json" in m]
    np.save(tmp_path / "keep.npy", np.array(sorted(divmod(int(h, 16), 2**64) for h in uids[::2]), FL.UID))
    args = ["filter.py", "reshard", "--input", str(tmp_path / "x"), str(tmp_path / "y"), "--uids",
            str(tmp_path / "keep.npy"), "--shard-size", "1", "--workers", "1", "--out"]
    subprocess.run([sys.executable, *args, str(tmp_path / "clean")], cwd=REPO, check=True, capture_output=True)
    p = subprocess.Popen([sys.executable, *args, str(tmp_path / "killed")], cwd=REPO, stderr=subprocess.DEVNULL)
    def tars():
        d = tmp_path / "killed"
        return len([f for f in os.listdir(d) if f.endswith(".tar")]) if os.path.isdir(d) else 0
    while p.poll() is None and tars() < 10:
        time.sleep(0.01)
    p.send_signal(signal.SIGKILL)
    p.wait()
    n_before = tars()
    subprocess.run([sys.executable, *args, str(tmp_path / "killed")], cwd=REPO, check=True, capture_output=True)
    files = sorted(f for f in os.listdir(tmp_path / "clean") if f.endswith((".tar", "_stats.json")))
    n = len(uids[::2])
    assert len(files) == 2 * n and n_before < n  # the kill landed mid-run
    assert files == sorted(f for f in os.listdir(tmp_path / "killed") if f.endswith((".tar", "_stats.json")))
    for f in files:
        assert open(tmp_path / "clean" / f, "rb").read() == open(tmp_path / "killed" / f, "rb").read(), f
