"""sft.py: exact masks in both chat styles, truncation at turn boundaries, packed == unpacked through train.make_batch,
every usable conversation prepared the right number of times, bad input counted by reason, 2 ranks == 1 process,
SIGKILL + resume == uninterrupted."""
import collections
import dataclasses
import io
import json
import os
import shutil
import signal
import time

import numpy as np
import pytest
import torch
from PIL import Image

import model as M
import pack
import sft
import test_train
import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEQ = 256


def jpeg(seed=0, size=16):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


@pytest.fixture(scope="session")
def tok_path(toy_world):
    return os.path.join(toy_world, "tokenizer.json")


@pytest.fixture(scope="session")
def tok(tok_path):
    return M.Tokenizer(tok_path)


@pytest.fixture(scope="session")
def init(tok, tok_path, tmp_path_factory):
    """A random tiny VLM saved as train.py's final/ (64 px images, patch 8: a full grid of 64 tokens)."""
    d = str(tmp_path_factory.mktemp("init") / "final")
    c = M.preset("tiny", vocab_size=-(-len(tok) // 64) * 64)
    net = M.VLM(c).init_weights(3)
    net.save_pretrained(d)
    shutil.copyfile(tok_path, os.path.join(d, "tokenizer.json"))
    return d


def config(init, out, *flags):
    return M.parse_config(sft.Config, ["--init", init, "--out", str(out), "--seq-len", str(SEQ), "--prep-workers", "1",
                                       *flags], sft.PRESETS)


def sources_dir(tmp_path):
    d = tmp_path / "src"
    (d / "img").mkdir(parents=True)
    for k in range(3):
        (d / "img" / f"{k}.jpg").write_bytes(jpeg(k))
    return d


def h(v):
    return {"from": "human", "value": v}


def g(v):
    return {"from": "gpt", "value": v}


def supervised(ids, labels):
    return [i for i, lab in zip(ids, labels) if lab != M.IGNORE]


def reply(tok, text):
    return tok.encode(text.strip()) + [tok.eos_id] + tok.encode("\n")


# ---------------------------------------------------------------------------------------------------------------
# Masks and truncation


KINDS = {
    "single": ({"image": "img/0.jpg", "conversations": [h("<image>\nwhat colour?"), g("red")]}, 1),
    "multi_turn": ({"image": "img/0.jpg", "conversations": [h("<image>\nwhat?"), g("a red circle"), h("how many?"),
                                                               g("two")]}, 1),
    "multi_image": ({"image": ["img/0.jpg", "img/1.jpg"], "conversations": [h("<image>\n<image>\nsame?"), g("no")]}, 2),
    "text_only": ({"conversations": [h("say red"), g("red")]}, 0),
    "system": ({"image": "img/2.jpg", "conversations": [{"from": "system", "value": "Answer in one word."},
                                                          h("<image>\nwhat?"), g("star")]}, 1),
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_masks_qwen2_every_kind(kind, tok, init, tmp_path):
    rec, n_images = KINDS[kind]
    cfg = config(init, tmp_path / "o")
    d = sft.conversation(rec, cfg, tok, str(sources_dir(tmp_path)))
    assert isinstance(d, pack.Doc), d
    replies = [t["value"] for t in rec["conversations"] if t["from"] == "gpt"]
    assert supervised(d.ids, d.labels) == [t for r in replies for t in reply(tok, r)]
    assert all(lab in (M.IGNORE, i) for i, lab in zip(d.ids, d.labels))
    assert d.ids.count(M.IMAGE_ID) == len(d.images) == n_images
    assert [data for _, data in d.images] == [jpeg(int(p[4])) for p in ([rec["image"]] if isinstance(
        rec.get("image"), str) else rec.get("image", []))]
    text = tok.decode([i for i in d.ids if i != M.IMAGE_ID], skip_special=False)
    system = rec["conversations"][0]["value"] if kind == "system" else M.SYSTEM_PROMPT
    assert text.startswith(f"<s><|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\n")
    assert d.ids == M.chat_tokens(tok, [t for t in rec["conversations"] if t["from"] != "system"],
                                  system=system)[0]


def test_mask_release_style_one_image(tok, init, tmp_path):
    cfg = config(init, tmp_path / "o", "--chat-style", "release")
    root = str(sources_dir(tmp_path))
    d = sft.conversation(KINDS["single"][0], cfg, tok, root)
    assert d.ids[0] == M.IMAGE_ID and d.ids.count(M.IMAGE_ID) == 1
    assert supervised(d.ids, d.labels) == reply(tok, "red")
    assert tok.decode(d.ids[1:], skip_special=False).endswith("<|im_end|>assistantred<|im_end|>\n")
    assert sft.conversation(KINDS["multi_image"][0], cfg, tok, root) == "release_needs_one_image"


def test_truncation_at_turn_boundaries_keeps_whole_images(tok, init, tmp_path):
    rec = {"image": ["img/0.jpg", "img/1.jpg"], "conversations": [h("<image>\nwhat?"), g("a red circle"),
                                                                  h("and here? <image>"), g("a blue star " * 5)]}
    root = str(sources_dir(tmp_path))
    whole = sft.conversation(rec, config(init, tmp_path / "o", "--seq-len", "1024"), tok, root)
    assert whole.ids.count(M.IMAGE_ID) == 2 and not whole.truncated
    one_turn = len(M.chat_tokens(tok, rec["conversations"][:2])[0]) + 63  # the first image expands to 64 tokens
    for seq in (one_turn, one_turn + 64 + 10, len(whole.ids) + 2 * 63 - 1):  # room for part of the second turn only
        d = sft.conversation(rec, config(init, tmp_path / "o", "--seq-len", str(seq)), tok, root)
        assert d.truncated and d.ids == whole.ids[: len(d.ids)] and d.labels == whole.labels[: len(d.ids)]
        assert supervised(d.ids, d.labels) == reply(tok, "a red circle")  # nothing of the dropped reply
        assert d.ids.count(M.IMAGE_ID) == len(d.images) == 1
    assert sft.conversation(rec, config(init, tmp_path / "o", "--seq-len", str(one_turn - 1)), tok, root) == "too_long"


# ---------------------------------------------------------------------------------------------------------------
# Preparation


@pytest.fixture(scope="session")
def prepared(toy_world, init, tmp_path_factory):
    """The toy SFT set prepared packed and unpacked."""
    out = {}
    for mode in ("--pack", "--no-pack"):
        cfg = config(init, tmp_path_factory.mktemp("prep") / "run", "--data", os.path.join(toy_world, "sft",
                                                                                          "sft.json"), mode)
        sft.prepare(cfg, 0)
        out[mode] = cfg
    return out


def rows_by_uid(cfg):
    return {tuple(u): (row, k) for row in pack.read_packed(cfg.prepared) for k, u in enumerate(row["uids"])}


def test_packed_step_equals_unpacked(prepared, init, tok):
    packed_cfg, plain_cfg = prepared["--pack"], prepared["--no-pack"]
    rows = sorted(pack.read_packed(packed_cfg.prepared), key=lambda r: -len(r["doc_lengths"]))[:4]
    assert sum(len(r["doc_lengths"]) for r in rows) >= 8  # several conversations a row
    plain = rows_by_uid(plain_cfg)
    singles = [plain[tuple(u)][0] for r in rows for u in r["uids"]]
    assert all(len(r["doc_lengths"]) == 1 for r in singles)
    net = M.VLM.from_pretrained(init, image_tokens=packed_cfg.image_tokens)
    net.vision.requires_grad_(False)

    def step(rows, cfg):
        b = train.make_batch(rows, cfg, 64, tok.pad_id)
        net.zero_grad()
        loss = net(b["input_ids"], M.normalize_pixels(b["pixels"]), b["doc_lens"], b["targets"]) / b["n_sup"]
        loss.backward()
        return b, loss.item(), {n: p.grad.clone() for n, p in net.named_parameters() if p.grad is not None}

    bp, lp, gp = step(rows, packed_cfg)
    bu, lu, gu = step(singles, plain_cfg)
    assert bp["input_ids"].shape[1] == SEQ and bu["input_ids"].shape[1] < SEQ  # --no-pack pads to the longest row
    assert bp["n_sup"] == bu["n_sup"] > 0 and bp["n_images"] == bu["n_images"]
    assert abs(lp - lu) <= 1e-5 * abs(lu)
    assert gp.keys() == gu.keys() and len(gp) > 10
    assert max((gp[k] - gu[k]).abs().max().item() for k in gp) <= 1e-5 * max(gu[k].abs().max().item() for k in gu)


def test_prepared_rows_hold_every_usable_conversation_the_right_number_of_times(toy_world, init, tok, tmp_path):
    src = os.path.join(toy_world, "sft", "sft.json")
    records = json.load(open(src))
    jsonl = tmp_path / "part.jsonl"  # the same conversations as JSON Lines, beside the images
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in records[:50]))
    cfg = config(init, tmp_path / "run", "--data", f"{src}:2.5", f"{jsonl}:0.5", "--image-root",
                 os.path.join(toy_world, "sft"), "--shard-size", "64", "--seq-len", "1024")
    stats = sft.prepare_rows(cfg, os.path.join(init, "tokenizer.json"))
    seen = collections.Counter()
    for row in pack.read_packed(cfg.prepared):
        start, img = 0, 0
        for (s, i, _), n in zip(row["uids"], row["doc_lengths"]):
            rec = (records if s == 0 else records[:50])[i]
            ids, labels = M.chat_tokens(tok, rec["conversations"])
            assert row["input_ids"][start: start + n].tolist() == ids
            assert row["labels"][start: start + n].tolist() == labels
            k = ids.count(M.IMAGE_ID)
            paths = rec.get("image", [])
            want = [open(os.path.join(toy_world, "sft", p), "rb").read() for p in ([paths] if isinstance(paths, str)
                                                                                  else paths)]
            assert row["images"][img: img + k] == want
            seen[s, i] += 1
            start, img = start + n, img + k
    assert all(seen[0, i] in (2, 3) for i in range(len(records)))
    assert 0.35 < sum(seen[0, i] == 3 for i in range(len(records))) / len(records) < 0.65
    assert all(seen[1, i] in (0, 1) for i in range(50)) and 10 < sum(seen[1, i] for i in range(50)) < 40
    assert all(seen[s, i] == sft.copies(cfg.seed, s, i, 2.5 if s == 0 else 0.5) for s, i in seen)
    assert stats["docs_out"] == sum(seen.values()) and stats["conversations_in"] == len(records) + 50
    assert stats["used"] + sum(stats["skipped"].values()) == stats["conversations_in"]
    assert stats["skipped"] == {"repeat_not_drawn": 50 - sum(seen[1, i] for i in range(50))}
    again = sft.prepare_rows(cfg, os.path.join(init, "tokenizer.json"))  # cached
    assert again == json.loads(json.dumps(stats))
    with pytest.raises(SystemExit, match="other settings"):
        sft.prepare_rows(dataclasses.replace(cfg, chat_style="release"), os.path.join(init, "tokenizer.json"))


def test_bad_input_every_kind_counted(init, tok, tmp_path):
    d = sources_dir(tmp_path)
    (d / "img" / "cut.jpg").write_bytes(jpeg(5)[:200])
    (d / "img" / "empty.jpg").write_bytes(b"")
    good = [h("<image>\nwhat?"), g("red")]
    broken = {
        "missing_image": {"image": "img/nope.jpg", "conversations": good},
        "corrupt_image": {"image": "img/cut.jpg", "conversations": good},
        "empty_image": {"image": "img/empty.jpg", "conversations": good},
        "image_tag_mismatch": {"image": ["img/0.jpg", "img/1.jpg"], "conversations": good},
        "no_assistant_turn": {"conversations": [h("hello")]},
        "roles_out_of_order": {"conversations": [g("red"), h("what?")]},
        "bad_role": {"conversations": [h("what?"), {"from": "robot", "value": "red"}]},
        "empty_value": {"conversations": [h("what?"), g("  ")]},
        "non_string_value": {"conversations": [h("what?"), g(["red"])]},
        "bad_record": {"image": "img/0.jpg"},
        "too_long": {"conversations": [h("red " * 400), g("red")]},
    }
    records = [{"id": k, **v} for k, v in broken.items()] + [{"id": "ok", "image": "img/0.jpg", "conversations": good},
                                                            {"id": "ok2", "conversations": good[1:]}]
    records[-1]["conversations"] = [h("what?"), g("red"), h("and?")]  # a trailing question is dropped, not skipped
    (d / "a.json").write_text(json.dumps(records))
    (d / "b.jsonl").write_text(json.dumps(records[-2]) + "\n{not json\n" + json.dumps(records[0]) + "\n")
    cfg = config(init, tmp_path / "run", "--data", str(d / "a.json"), str(d / "b.jsonl"))
    stats = sft.prepare_rows(cfg, os.path.join(init, "tokenizer.json"))
    assert stats["skipped"] == {**{k: 1 for k in broken}, "missing_image": 2, "bad_json_line": 1}
    assert stats["conversations_in"] == len(records) + 3 == stats["used"] + sum(stats["skipped"].values())
    assert stats["used"] == 3 and stats["dropped_trailing_turns"] == 1
    assert stats["first_skipped_ids"]["missing_image"] == ["missing_image", "missing_image"]
    assert stats["first_skipped_ids"]["bad_json_line"] == [f"{d / 'b.jsonl'}:1"]
    saved = json.load(open(os.path.join(cfg.prepared, "stats.json")))
    assert saved["skipped"] == stats["skipped"]


def test_image_failing_at_training_time_supervises_nothing(prepared, tok):
    cfg = prepared["--pack"]
    row = next(r for r in pack.read_packed(cfg.prepared) if len(r["doc_lengths"]) >= 2 and len(r["images"]) >= 2
               and M.IMAGE_ID in r["input_ids"][: r["doc_lengths"][0]])  # the first document has the first image
    b = train.make_batch([row], cfg, 64, tok.pad_id)
    broken = dict(row, images=[row["images"][0][:100]] + row["images"][1:])  # the first document's image
    bb = train.make_batch([broken], cfg, 64, tok.pad_id)
    first = b["doc_lens"][0][0]
    assert (bb["targets"][0, :first] == M.IGNORE).all() and (b["targets"][0, :first] != M.IGNORE).any()
    assert torch.equal(bb["targets"][0, first:], b["targets"][0, first:])  # the other documents are untouched
    assert (bb["pixels"][0] == 0).all() and bb["bad_images"] == bb["bad_docs"] == 1 and b["bad_docs"] == 0
    # pre-training rows (no labels on disk) follow the same policy
    ids = [tok.bos_id, M.IMAGE_ID] + tok.encode("\na red circle") + [tok.eos_id]
    pre = {"input_ids": np.array(ids * 2), "labels": np.array(ids * 2), "doc_lengths": [len(ids)] * 2,
           "images": [b"broken", row["images"][0]], "shard": "x", "row": 0}
    pb = train.make_batch([pre], train.Config(image_tokens=16, seq_len=64), 64, tok.pad_id)
    n = len(ids) + 15
    assert (pb["targets"][0, :n] == M.IGNORE).all() and pb["n_sup"] == len(ids) - 2 and pb["bad_docs"] == 1


def test_packing_refuses_plain_causal_attention(init, tmp_path):
    with pytest.raises(SystemExit, match="document mask"):
        sft.prepare(config(init, tmp_path / "o", "--no-doc-mask"), 0)


# ---------------------------------------------------------------------------------------------------------------
# The loop: same guarantees as pre-training


def flags(toy_world, init, out, *extra):
    return ["--data", os.path.join(toy_world, "sft", "sft.json"), "--init", init, "--out", str(out), "--seq-len",
            str(SEQ), "--global-batch", "8", "--micro-batch", "2", "--precision", "fp32", "--workers", "1",
            "--log-every", "100", "--prep-workers", "1", "--prepared", str(out) + "-prep", *extra]


def run(args, torchrun=0):
    return test_train.run(args, torchrun, script="sft.py")


finish, losses = test_train.finish, test_train.losses


def test_two_ranks_equal_one_process_and_final_config(toy_world, init, tmp_path):
    finish(run(flags(toy_world, init, tmp_path / "one", "--steps", "10")))
    finish(run(flags(toy_world, init, tmp_path / "two", "--steps", "10"), torchrun=2))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 10 and max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-5
    assert a[-1] < a[0]
    c = json.load(open(tmp_path / "one" / "final" / "config.json"))
    assert (c["stage"], c["chat_style"], c["system_prompt"], c["image_tokens"]) == ("sft", "qwen2", M.SYSTEM_PROMPT,
                                                                                    64)
    assert M.VLM.from_pretrained(str(tmp_path / "one" / "final")).config.image_tokens == 64


def test_resume_after_sigkill_is_exact(toy_world, init, tmp_path):
    from safetensors.torch import load_file
    steps = ["--steps", "24", "--ckpt-every", "3"]
    finish(run(flags(toy_world, init, tmp_path / "whole", *steps)))
    p = run(flags(toy_world, init, tmp_path / "killed", *steps))
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and p.poll() is None:
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "killed" / "final").exists()
    finish(run(flags(toy_world, init, tmp_path / "killed", *steps, "--resume", "auto")))
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")
    a, b = (load_file(str(tmp_path / r / "final" / "model.safetensors")) for r in ("whole", "killed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_generation_prompt_ends_after_the_assistant_header(tok):
    turns = KINDS["multi_turn"][0]["conversations"]
    for style in ("qwen2", "release"):
        full, _ = M.chat_tokens(tok, turns[:2], style)
        prompt, labels = M.chat_tokens(tok, turns[:1], style, generation_prompt=True)
        assert full[: len(prompt)] == prompt and all(lab == M.IGNORE for lab in labels)
        assert tok.decode(full[len(prompt):], skip_special=False) == "a red circle<|im_end|>\n"
    with pytest.raises(ValueError, match="end with a human turn"):
        M.chat_tokens(tok, turns[:2], generation_prompt=True)


def test_text_share_recipe(toy_world, init, tmp_path):
    src = os.path.join(toy_world, "sft", "sft.json")
    n_text = sum("image" not in r for r in json.load(open(src)))
    cfg = config(init, tmp_path / "run", "--data", src, "--text-share", "0.25", "--seq-len", "1024")
    stats = sft.prepare_rows(cfg, os.path.join(init, "tokenizer.json"))
    text = sum(1 for row in pack.read_packed(cfg.prepared) for i, n in zip(
        np.cumsum([0] + row["doc_lengths"][:-1]), row["doc_lengths"]) if M.IMAGE_ID not in row["input_ids"][i: i + n])
    assert n_text > 0 and text / stats["docs_out"] == pytest.approx(0.25, abs=0.03)
