"""pack.py on the toy world's shards: every document once, exact ids and image bytes, rows that fit, skips counted
under the right reasons, truncated tars, byte-identical reruns, and kills that leave nothing looking finished."""
import base64
import collections
import hashlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import tarfile
import time
import zlib

import numpy as np
import pytest
from PIL import Image

import model as M
import pack

SEQ, IMG = 1024, 16  # small rows and image cost: many rows per shard, many documents per row
REASON = {"truncated_jpeg": "corrupt_image", "zero_byte_image": "empty_image", "empty_caption": "empty_caption",
          "missing_txt": "missing_caption"}  # huge_caption is truncated (or too_long with --long drop)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def write_tar(path, members):
    with tarfile.open(path, "w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def image_bytes(w, h, fmt="JPEG", mode="RGB", seed=0):
    a = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    img = Image.fromarray(a).convert(mode)
    if mode == "RGBA":
        img.putalpha(128)
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


@pytest.fixture(scope="session")
def world(toy_world):
    """The toy world (tests/conftest.py): tokenizer.json, pool/00000N.tar shards of {key}.jpg/.txt/.json, and a
    manifest naming its broken records by kind."""
    return toy_world


def source_records(world):
    """{key: {ext: bytes}} straight from the pool tars, without pack.py."""
    recs = collections.defaultdict(dict)
    for name in sorted(os.listdir(os.path.join(world, "pool"))):
        with tarfile.open(os.path.join(world, "pool", name)) as tar:
            for m in tar:
                key, _, ext = m.name.partition(".")
                recs[key][ext] = tar.extractfile(m).read()
    return recs


def run(world, out, *flags):
    return pack.main(["--input", os.path.join(world, "pool"), "--output", str(out), "--tokenizer",
                      os.path.join(world, "tokenizer.json"), "--seq-len", str(SEQ), "--image-tokens", str(IMG), *flags])


def tree(out):
    """{file name: sha256} of a packed dir."""
    return {n: hashlib.sha256(open(os.path.join(out, n), "rb").read()).hexdigest() for n in sorted(os.listdir(out))}


def documents(out):
    """Every packed document: (key, uid, ids, images)."""
    for row in pack.read_packed(out):
        ids, start, img = row["input_ids"], 0, 0
        for key, uid, n in zip(row["keys"], row["uids"], row["doc_lengths"]):
            doc = ids[start: start + n].tolist()
            k = doc.count(M.IMAGE_ID)
            yield key, uid, doc, row["images"][img: img + k]
            start, img = start + n, img + k


@pytest.fixture(scope="session")
def packed(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("packed")
    stats = run(world, out, "--workers", "2")
    return str(out), stats


def test_every_document_once_with_exact_ids_and_bytes(world, packed):
    out, _ = packed
    tok = M.Tokenizer(os.path.join(world, "tokenizer.json"))
    manifest = json.load(open(os.path.join(world, "manifest.json")))["pool"]["broken"]
    bad = {k for kind, keys in manifest.items() if kind in REASON for k in keys}
    src = source_records(world)
    seen = collections.Counter()
    for key, uid, ids, images in documents(out):
        seen[key] += 1
        rec = src[key]
        caption = rec["txt"].decode().strip()
        assert uid == json.loads(rec["json"])["uid"]
        assert images == [rec.get("jpg", rec.get("png"))]  # the original bytes, untouched
        assert ids[:2] == [tok.bos_id, M.IMAGE_ID] and ids[-1] == tok.eos_id
        if key in manifest["huge_caption"]:  # truncated to exactly one row, still a prefix of the caption
            assert len(ids) + IMG - 1 == SEQ
            assert ids[:-1] == M.caption_tokens(tok, caption)[: len(ids) - 1]
        else:
            assert ids == M.caption_tokens(tok, caption)
            assert tok.decode(ids) == "\n" + caption  # round trip to the source text
    assert set(seen) == set(src) - bad and max(seen.values()) == 1
    assert set(manifest) == set(REASON) | {"huge_caption", "cmyk_jpeg", "png_alpha"}  # a new kind needs a test
    valid = {k: images[0] for k, _, _, images in documents(out) if k in manifest["cmyk_jpeg"] + manifest["png_alpha"]}
    assert len(valid) == len(manifest["cmyk_jpeg"] + manifest["png_alpha"]) > 0  # valid images pass through
    assert all(M.load_image(data).mode == "RGB" for data in valid.values())  # and load for training


def test_rows_fit_and_are_consistent(world, packed):
    out, stats = packed
    shards = pack.packed_shards(out)
    assert [os.path.basename(p) for p, _ in shards] == ["000000.tar", "000001.tar", "000002.tar"]
    rows = list(pack.read_packed(out))
    assert len(rows) == sum(n for _, n in shards) == stats["rows"]
    tokens = 0
    for row in rows:
        ids = row["input_ids"]
        assert ids.dtype == np.int32 and ids.ndim == 1
        assert sum(row["doc_lengths"]) == len(ids) and len(row["keys"]) == len(row["doc_lengths"])
        assert (ids == M.IMAGE_ID).sum() == len(row["images"])
        n = len(ids) + (IMG - 1) * len(row["images"])
        assert n <= SEQ
        tokens += n
    assert tokens == stats["tokens"] and stats["fill"] == tokens / (len(rows) * SEQ)
    longest = [max(row["doc_lengths"]) for row in rows if row["shard"] == "000000.tar"]
    assert longest != sorted(longest, reverse=True)  # rows are shuffled, not in the order the packer built them
    with tarfile.open(shards[0][0]) as tar:  # plain tar: standard tools read it
        first = {m.name: tar.extractfile(m).read() for m in tar.getmembers()[:2 + len(rows[0]["images"])]}
    assert first["000000.json"] and [first[f"000000.{j:04d}.jpg"] for j in range(len(rows[0]["images"]))] == \
        [im for im in rows[0]["images"]]
    batch = M.collate_rows(rows[:4], IMG, SEQ, pad_id=0)  # what train.py will do with them
    assert batch["input_ids"].shape == (4, SEQ)
    for image in rows[0]["images"]:
        assert M.load_image(image).mode == "RGB"
    # iter_rows seeks: starting mid-shard gives the tail of the full iteration
    path, n = shards[1]
    full = list(pack.iter_rows(path))
    tail = list(pack.iter_rows(path, start=n - 3))
    assert [r["keys"] for r in tail] == [r["keys"] for r in full[-3:]] and list(pack.iter_rows(path, n)) == []


def test_counts_and_reasons(world, packed):
    out, stats = packed
    manifest = json.load(open(os.path.join(world, "manifest.json")))["pool"]["broken"]
    assert stats == json.load(open(os.path.join(out, "stats.json")))
    assert stats["samples_in"] == len(source_records(world))
    assert stats["samples_in"] == stats["docs_out"] + sum(stats["skipped"].values())
    want = collections.Counter()
    for kind, reason in REASON.items():
        want[reason] += len(manifest[kind])
    assert stats["skipped"] == dict(want)
    assert stats["truncated_docs"] == len(manifest["huge_caption"])
    assert (stats["seq_len"], stats["image_tokens"]) == (SEQ, IMG)
    assert stats["vocab_size"] == len(M.Tokenizer(os.path.join(world, "tokenizer.json")))


def test_long_documents_dropped_on_request(world, tmp_path):
    manifest = json.load(open(os.path.join(world, "manifest.json")))["pool"]["broken"]
    stats = run(world, tmp_path, "--long", "drop", "--method", "ffd")
    assert stats["skipped"]["too_long"] == len(manifest["huge_caption"]) and stats["truncated_docs"] == 0
    assert stats["samples_in"] == stats["docs_out"] + sum(stats["skipped"].values())
    assert not {k for k, *_ in documents(tmp_path)} & set(manifest["huge_caption"])


def test_rerun_restores_a_deleted_shard_byte_identically(world, packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed[0], out)
    before = tree(out)
    others = {n: os.stat(out / n).st_mtime_ns for n in before if n.startswith(("000000", "000002"))}
    os.remove(out / "000001.tar")
    os.remove(out / "000001.stats.json")
    run(world, out, "--workers", "1")
    assert tree(out) == before
    assert {n: os.stat(out / n).st_mtime_ns for n in others} == others  # finished shards were not redone
    with pytest.raises(SystemExit, match="other settings"):
        run(world, out, "--method", "ffd")  # never mix shards packed with different flags


def test_unfinished_files_are_never_taken_for_finished(world, packed, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(packed[0], out)
    before = tree(out)
    # what a kill can leave: temp files, a tar whose stats never got written, a tar cut short after its stats
    open(out / ".000000.tar.tmp", "wb").write(b"partial")
    os.remove(out / "000001.stats.json")
    with open(out / "000002.tar", "r+b") as f:
        f.truncate(10240)
    os.remove(out / "stats.json")
    assert [os.path.basename(p) for p, _ in pack.packed_shards(out)] == ["000000.tar"]
    with pytest.raises(FileNotFoundError):
        next(pack.iter_rows(str(out / "000001.tar")))
    run(world, out, "--workers", "1")
    assert tree(out) == before


def test_sigkill_mid_run(world, packed, tmp_path):
    """Kill a real run at whatever point it has reached: what is there must be complete or invisible."""
    src = tmp_path / "pool"
    os.makedirs(src)
    for k in range(12):  # enough shards that the kill lands mid-run
        shutil.copy(os.path.join(world, "pool", f"00000{k % 3}.tar"), src / f"{k:06d}.tar")
    cmd = [sys.executable, os.path.join(ROOT, "pack.py"), "--input", str(src), "--output", str(tmp_path / "out"),
           "--tokenizer", os.path.join(world, "tokenizer.json"), "--seq-len", str(SEQ), "--image-tokens", str(IMG),
           "--workers", "1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while proc.poll() is None and not os.path.exists(tmp_path / "out" / "000001.stats.json"):
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = pack.packed_shards(str(tmp_path / "out"))
    assert 2 <= len(finished) < 12 and not os.path.exists(tmp_path / "out" / "stats.json")
    for path, n in finished:  # every shard that looks finished reads completely
        assert len(list(pack.iter_rows(path))) == n
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    restarted = tree(tmp_path / "out")
    shutil.rmtree(tmp_path / "out")
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert tree(tmp_path / "out") == restarted  # the resumed run equals a clean one, byte for byte


def test_truncated_tars_keep_what_came_before(world, tmp_path):
    src = os.path.join(world, "pool", "000000.tar")
    data, members = open(src, "rb").read(), tarfile.open(src).getmembers()
    keys = list(dict.fromkeys(m.name.partition(".")[0] for m in members))
    second = [m for m in members if m.name.startswith(keys[13] + ".")][1]  # sample 13's second member
    first14 = [m for m in members if m.name.startswith(keys[14] + ".")][0]
    os.makedirs(tmp_path / "in")
    open(tmp_path / "in" / "a.tar", "wb").write(data[: second.offset_data + 7])  # inside a member's data
    open(tmp_path / "in" / "b.tar", "wb").write(data[: first14.offset])  # at a header, right before sample 14
    open(tmp_path / "in" / "c.tar", "wb").write(b"")
    stats = pack.main(["--input", str(tmp_path / "in" / "*.tar"), "--output", str(tmp_path / "out"), "--tokenizer",
                       os.path.join(world, "tokenizer.json"), "--seq-len", str(SEQ), "--image-tokens", str(IMG)])
    per = {n: json.load(open(tmp_path / "out" / f"{n}.stats.json")) for n in "abc"}
    assert per["a"]["samples_in"] == 14 and per["a"]["skipped"].get("truncated_tar") == 1
    assert per["b"]["samples_in"] == 14 and per["b"]["skipped"].get("truncated_tar") == 1  # complete? unknowable
    assert per["c"]["samples_in"] == 0 and per["c"]["rows"] == 0
    assert all(s["broken_tar"] for s in per.values()) and len(stats["broken_tars"]) == 3
    assert stats["samples_in"] == stats["docs_out"] + sum(stats["skipped"].values())
    broken = {k for kind, ks in json.load(open(os.path.join(world, "manifest.json")))["pool"]["broken"].items()
              if kind in REASON for k in ks}
    packed = collections.Counter(k for k, *_ in documents(tmp_path / "out"))
    assert packed == {k: 2 for k in keys[:13] if k not in broken}  # a and b both keep samples 0..12


@pytest.mark.parametrize("fmt", [tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_read_tar_long_names_and_corrupt_headers(tmp_path, fmt):
    long = "d" * 90 + "/ünïcode-" + "k" * 80  # past ustar's 100 bytes: a GNU long name or a pax path record
    members = [(f"{long}{i}.{ext}", f"{i}{ext}".encode() * 300) for i in range(3) for ext in ("jpg", "txt")]
    with tarfile.open(tmp_path / "a.tar", "w", format=fmt) as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    got = list(pack.read_tar(str(tmp_path / "a.tar")))
    assert [k for k, _ in got] == [f"{long}{i}" for i in range(3)]
    assert [m["txt"][0] for _, m in got] == [f"{i}txt".encode() * 300 for i in range(3)]
    data = bytearray(open(tmp_path / "a.tar", "rb").read())
    at = [m.offset for m in tarfile.open(tmp_path / "a.tar")][4]  # the header of sample 2's jpg
    data[at + 130] ^= 1  # one flipped bit in a size field
    open(tmp_path / "b.tar", "wb").write(data)
    got = list(pack.read_tar(str(tmp_path / "b.tar")))
    assert [k for k, _ in got] == [f"{long}0", f"{long}1"]  # sample 1 was being read when it broke
    assert isinstance(got[0][1], dict) and "corrupt header" in got[1][1]


def test_interleaved_documents(world, tmp_path):
    tok = M.Tokenizer(os.path.join(world, "tokenizer.json"))
    good, tiny = image_bytes(20, 16), image_bytes(1, 16, "PNG")
    pngs = [image_bytes(8, 8, "PNG", seed=i) for i in range(80)]
    b64 = base64.b64encode
    docs = {
        "d0": {"texts": ["a red circle", None, "on the left", None], "image_info":
               [None, {"image_base64": b64(good).decode()}, None, {"image_base64": b64(tiny).decode()}]},
        "d1": {"texts": [None, "two stars"], "image_info": [{"image_base64": "not base64!"}, None]},
        "d2": {"texts": ["no image here"], "image_info": [None]},
        "d3": {"texts": ["big"] + [None] * 80, "image_info": [None] + [{"image_base64": b64(im).decode()}  # too long
                                                                       for im in pngs]},
    }
    os.makedirs(tmp_path / "in")
    write_tar(tmp_path / "in" / "x.tar", [(f"{k}.json", json.dumps(v).encode()) for k, v in docs.items()] +
              [("e.jpg", good), ("e.txt", b"\xff\xfe bad utf-8"), ("f.txt", b"no image"), ("g.jpg", tiny),
               ("g.txt", b"tiny"), ("h.jpg", good), ("h.json", b"{not json")])
    stats = pack.main(["--input", str(tmp_path / "in" / "x.tar"), "--output", str(tmp_path / "out"), "--tokenizer",
                       os.path.join(world, "tokenizer.json"), "--seq-len", str(SEQ), "--image-tokens", str(IMG)])
    assert stats["skipped"] == {"corrupt_image": 1, "missing_image": 2, "bad_text": 1, "tiny_image": 1,
                                "bad_json": 1}
    assert stats["docs_out"] == 2 and stats["dropped_images"] == 1 and stats["truncated_docs"] == 1
    docs = {key: (ids, images) for key, uid, ids, images in documents(tmp_path / "out")}
    assert docs["d0"] == (M.interleaved_tokens(tok, ["a red circle", None, "on the left"]), [good])
    ids, images = docs["d3"]  # cut to fit one row, without the image left dangling at the end
    full = M.interleaved_tokens(tok, ["big"] + [None] * 80)
    assert ids == pack.fit(full, IMG, SEQ, tok.eos_id) and ids[-2] != M.IMAGE_ID and ids[-1] == tok.eos_id
    assert images == pngs[: ids.count(M.IMAGE_ID)] and len(ids) + (IMG - 1) * len(images) > SEQ - IMG - 2


def test_fit_cuts_after_expansion_and_drops_trailing_images():
    I = M.IMAGE_ID  # noqa: E741
    assert pack.fit([1, I, 5, 6, I, 7, 8, 2], 3, 7, eos=2) == [1, I, 5, 6, 2]  # 1 + 3 + 1 + 1 + EOS = 7
    assert pack.fit([1, I, 5, 6, I, 7, 8, 2], 3, 10, eos=2) == [1, I, 5, 6, 2]  # the second image would end it
    assert pack.fit([1, I, 5, 6, I, 7, 8, 2], 3, 11, eos=2) == [1, I, 5, 6, I, 7, 2]


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_image_checks_read_headers_only():
    jpg = image_bytes(30, 20)
    assert pack.check_image(jpg) == ("jpg", None)
    assert pack.check_image(jpg + b"\0" * 100) == ("jpg", None)  # zero padding after EOI is harmless
    assert pack.check_image(jpg[:-2]) == (None, "corrupt_image")
    assert pack.check_image(b"") == (None, "empty_image")
    assert pack.check_image(b"GIF89a" + b"\x00" * 20) == (None, "corrupt_image")
    assert pack.check_image(os.urandom(2000)) == (None, "corrupt_image")
    for fmt, ext in (("PNG", "png"), ("WEBP", "webp"), ("GIF", "gif")):
        data = image_bytes(30, 20, fmt)
        assert pack.check_image(data) == (ext, None)
        assert pack.check_image(data[: len(data) - 5])[1] == "corrupt_image"
    assert pack.check_image(image_bytes(1, 30))[1] == "tiny_image"
    for side in (10000, 20000):  # over model.MAX_IMAGE_PIXELS; over twice that, PIL itself refuses
        png = bytearray(image_bytes(4, 4, "PNG"))  # a PNG whose header claims side x side
        png[16:24] = side.to_bytes(4, "big") * 2
        png[29:33] = zlib.crc32(png[12:29]).to_bytes(4, "big")
        assert pack.check_image(bytes(png))[1] == "huge_image"


def test_ffd_is_the_papers_and_fill_closes_rows():
    def ffd_reference(lengths, cap):  # the official first_fit_decreasing_with_ids, as a plain scan
        bins = []
        for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
            for b in bins:
                if sum(lengths[j] for j in b) + lengths[i] <= cap:
                    b.append(i)
                    break
            else:
                bins.append([i])
        return bins

    rng = np.random.default_rng(0)
    for n in (0, 1, 2, 7, 300):
        lengths = rng.integers(1, 60, n).tolist()
        assert pack.pack_ffd(lengths, 100) == ffd_reference(lengths, 100)
    words = np.maximum(1, np.round(rng.lognormal(np.log(12) - 0.245, 0.7, 2500))).astype(int)
    lengths = (words + rng.binomial(words, 0.3) + 147).tolist()  # caption documents at 144 image tokens
    for method in ("ffd", "fill"):
        rows = pack.PACKERS[method](lengths, 4096)
        assert sorted(i for r in rows for i in r) == list(range(len(lengths)))
        assert max(sum(lengths[i] for i in r) for r in rows) <= 4096
        if method == "fill":  # the fewest rows possible: all full but the last
            assert len(rows) == -(-sum(lengths) // 4096)
        else:
            assert len(rows) > -(-sum(lengths) // 4096)
    for lo, hi in ((1, 4096), (1000, 3000), (2000, 2100)):  # far from captions: still valid, never worse than FFD
        lengths = rng.integers(lo, hi + 1, 200).tolist()
        rows = pack.pack_fill(lengths, 4096)
        assert sorted(i for r in rows for i in r) == list(range(200))
        assert max(sum(lengths[i] for i in r) for r in rows) <= 4096
        assert len(rows) <= len(pack.pack_ffd(lengths, 4096))


def test_inputs_and_names(tmp_path):
    assert pack.expand_braces("/d/{0008..0010}.tar") == ["/d/0008.tar", "/d/0009.tar", "/d/0010.tar"]
    assert pack.expand_braces("{a,b}{1..2}") == ["a1", "a2", "b1", "b2"]
    assert pack.expand_braces("x{y}") == ["x{y}"]
    for d in ("ccs", "datacomp"):
        os.makedirs(tmp_path / d)
        for i in range(2):
            open(tmp_path / d / f"{i:05d}.tar", "wb").close()
    paths = pack.resolve_inputs([str(tmp_path / "ccs"), str(tmp_path / "datacomp/{00000..00001}.tar")])
    assert pack.output_names(paths) == ["ccs__00000", "ccs__00001", "datacomp__00000", "datacomp__00001"]
    assert pack.output_names(paths[:2]) == ["00000", "00001"]
    with pytest.raises(SystemExit, match="no input shard"):
        pack.resolve_inputs([str(tmp_path / "ccs/{00000..00002}.tar")])  # a missing shard is an error
    cfg = M.parse_config(pack.PackConfig, ["--input", "a", "b*", "--workers", "2"])
    assert cfg.input == ["a", "b*"] and cfg.workers == 2 and cfg.seq_len == 4096 and cfg.image_tokens == 144
    assert pack.expand_braces("{0..10}")[-2:] == ["9", "10"] and pack.expand_braces("{3..1}") == ["1", "2", "3"]


def test_braces_around_literals_and_files_beside_globs(tmp_path):
    assert pack.expand_braces("{x}{a,b}/{y}{1..2}") == ["{x}a/{y}1", "{x}a/{y}2", "{x}b/{y}1", "{x}b/{y}2"]
    assert pack.expand_braces("{a,{b,c}}") == ["a", "b", "a", "c"] and pack.expand_braces("{1..2,3}") == ["1..2", "3"]
    assert pack.expand_braces("{,x}{07..9}") == ["07", "08", "09", "x07", "x08", "x09"]
    os.makedirs(tmp_path / "d" / "sub.tar")  # a directory's *.tar glob takes what matches, as any glob does
    for name in ("a.tar", "b.tar"):
        open(tmp_path / "d" / name, "wb").close()
    found = pack.resolve_inputs([str(tmp_path / "d"), str(tmp_path / "d" / "a.tar"), str(tmp_path / "d" / "?.tar")])
    assert found == [str(tmp_path / "d" / n) for n in ("a.tar", "b.tar", "sub.tar")]  # sorted, without duplicates
    with pytest.raises(SystemExit, match="no input shard"):
        pack.resolve_inputs([str(tmp_path / "d" / "c.tar")])


def test_read_doc_reasons():
    """Each reason a caption sample is skipped, in the order they are checked."""
    tok = type("Tok", (), {"bos_id": 1, "eos_id": 2, "encode": lambda self, text: [5] * len(text)})()
    jpg = image_bytes(8, 8)
    cases = [({"json": b"[1, 2]", "jpg": jpg, "txt": b"x"}, "bad_json"), ({"json": b"null", "txt": b"x"}, "bad_json"),
             ({"json": b"{", "jpg": jpg, "txt": b"x"}, "bad_json"), ({"txt": b"x"}, "missing_image"),
             ({"json": b"{}"}, "missing_image"), ({"png": jpg}, "missing_caption"),
             ({"jpg": jpg, "txt": b"\xff"}, "bad_text"), ({"jpg": b"", "txt": b" \n "}, "empty_caption"),
             ({"jpg": jpg[:-2], "txt": b"x"}, "corrupt_image"), ({"jpg": b"", "txt": b"x"}, "empty_image"),
             ({"json": b'{"texts": [], "image_info": [null]}'}, "bad_json")]
    for members, reason in cases:
        assert pack.read_doc("k", {e: (b, 0) for e, b in members.items()}, tok, collections.Counter()) == reason
    members = {"json": (b'{"key": "K", "uid": 7}', 0), "jpg": (jpg, 1536), "txt": (b" hi ", 0)}
    doc = pack.read_doc("k", members, tok, collections.Counter())
    assert (doc.key, doc.uid, doc.ids, [ext for ext, _ in doc.images]) == ("K", 7, [1, M.IMAGE_ID, 5, 5, 5, 2], ["jpg"])
