"""train.py: 2-rank FSDP equals 1 process, SIGKILL + resume equals uninterrupted, every row used exactly once."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def packed(toy_world, tmp_path_factory):
    import pack
    out = str(tmp_path_factory.mktemp("packed") / "p")
    pack.main(["--input", os.path.join(toy_world, "pool"), "--output", out, "--tokenizer",
               os.path.join(toy_world, "tokenizer.json"), "--seq-len", "128", "--image-tokens", "16"])
    return out, os.path.join(toy_world, "tokenizer.json")


def flags(packed, out, *extra):
    data, tok = packed
    return ["--data", data, "--tokenizer", tok, "--seq-len", "128", "--out", str(out), "--global-batch", "8",
            "--micro-batch", "2", "--precision", "fp32", "--workers", "1", "--log-every", "100", *extra]


def run(args, torchrun=0, script="train.py", **kw):  # tests/test_sft.py runs sft.py with it too
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = ([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={torchrun}"]
           if torchrun else [sys.executable]) + [os.path.join(REPO, script), *args]
    return subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def finish(p):
    out, _ = p.communicate(timeout=900)
    assert p.returncode == 0, out
    return out


def losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line)["loss"] for line in f]


def final_weights(out):
    from safetensors.torch import load_file
    return load_file(os.path.join(out, "final", "model.safetensors"))


def test_two_ranks_equal_one_process(packed, tmp_path):
    finish(run(flags(packed, tmp_path / "one", "--steps", "10")))
    finish(run(flags(packed, tmp_path / "two", "--steps", "10"), torchrun=2))
    a, b = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert len(a) == len(b) == 10
    assert max(abs(x - y) / abs(x) for x, y in zip(a, b)) <= 1e-5
    assert a[-1] < a[0]


def test_resume_after_sigkill_is_exact(packed, tmp_path):
    steps = ["--steps", "30", "--ckpt-every", "3"]
    finish(run(flags(packed, tmp_path / "whole", *steps)))
    p = run(flags(packed, tmp_path / "killed", *steps))
    metrics = tmp_path / "killed" / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and p.poll() is None:  # kill once a checkpoint exists and training went past it
        if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
            break
        time.sleep(0.02)
    assert p.poll() is None, "the run finished before it could be killed"
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (tmp_path / "killed" / "final").exists()
    finish(run(flags(packed, tmp_path / "killed", *steps, "--resume", "auto")))
    assert losses(tmp_path / "killed") == losses(tmp_path / "whole")  # bitwise: JSON floats round-trip exactly
    a, b = final_weights(tmp_path / "whole"), final_weights(tmp_path / "killed")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert len(train.checkpoint_dirs(str(tmp_path / "killed"))) == 2  # keep=2, no .tmp taken for complete


def test_rows_split_across_ranks_and_workers_exactly_once(packed):
    data, tok = packed
    cfg = train.Config(data=data, seq_len=128, global_batch=8, micro_batch=2, workers=2)
    rows = train.Rows(data, cfg.seed)
    steps = rows.total // cfg.global_batch
    seen = []
    for rank in range(2):
        ds = train.MicroBatches(rows, cfg, rank, 2, 0, steps, 64, 0)
        for b in torch.utils.data.DataLoader(ds, batch_size=None, num_workers=2):
            seen += [tuple(r) for r in b["rows"]]
    assert len(seen) == len(set(seen)) == steps * cfg.global_batch  # no duplicates, nothing skipped
    later = train.MicroBatches(rows, cfg, 0, 1, 3, 4, 64, 0)  # resuming at step 3 reads step 3's rows
    first = [tuple(r) for r in next(iter(later))["rows"]]
    assert first == [(r["shard"], r["row"]) for r in rows.read(3 * 8, 2)]


def test_lr_schedule_warmup_then_cosine():
    cfg = train.Config(lr=1.0, warmup=0.1)
    lrs = [train.lr_at(s, 100, cfg) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # the first step already moves
    assert all(a >= b for a, b in zip(lrs[9:], lrs[10:])) and lrs[-1] < 1e-3


def test_dry_run_paper(capsys):
    train.dry_run(train.M.parse_config(train.Config, ["--preset", "paper"], train.PRESETS), 151667)
    out = capsys.readouterr().out
    assert "220 A100" in out and "GPU-hours" in out
    assert "trainable" in out and "frozen" in out


def test_non_finite_loss_stops_naming_step_and_rows(packed, tmp_path):
    with pytest.raises(RuntimeError, match=r"step \d+ \(rows from \d+.*non-finite"):
        train.main(flags(packed, tmp_path / "nan", "--steps", "20", "--lr", "1e30", "--warmup", "0", "--workers", "0"))
    assert not (tmp_path / "nan" / "final").exists()


def test_step_dirs_of_an_earlier_run_or_past_the_resumed_step_are_replaced(packed, tmp_path):
    """gpu-review 18: renaming step_N.tmp onto an existing step_N raised OSError 39."""
    out, fast = tmp_path / "run", ("--workers", "0", "--ckpt-every", "2")
    train.main(flags(packed, out, "--steps", "4", *fast))  # step_2 and step_4
    first = train.checkpoint_dirs(str(out))
    train.main(flags(packed, out, "--steps", "4", *fast, "--resume", first[0]))  # writes step_4 again
    assert train.checkpoint_dirs(str(out)) == first and len(losses(out)) == 4
    train.main(flags(packed, out, "--steps", "2", *fast, "--seed", "8"))  # a new run in the same --out
    (only,) = train.checkpoint_dirs(str(out))
    with open(os.path.join(only, "meta.json")) as f:
        assert os.path.basename(only) == "step_0000002" and json.load(f)["config"]["seed"] == 8


def test_no_save_writes_nothing_and_returns_the_records(packed, tmp_path):
    records = train.main(flags(packed, tmp_path / "nosave", "--steps", "3", "--workers", "0", "--save", "false"))
    assert not (tmp_path / "nosave").exists()
    assert [r["step"] for r in records] == [1, 2, 3] and records[-1]["loss"] < records[0]["loss"]
    assert all(0 < r["mfu"] and 0 < r["mfu_measured"] and r["tokens"] > 0 for r in records)


def test_docs_attention_under_compile_is_refused(packed, tmp_path):
    with pytest.raises(SystemExit, match="recompiles"):
        train.main(flags(packed, tmp_path / "x", "--attention", "docs", "--compile"))


def test_train_vision_resume_is_exact(packed, tmp_path):
    """--train-vision: the tower's parts the VLM never computes (blocks after its feature layer, the final norm,
    the head) stay frozen; trained, they got no gradient, hence no optimizer state, and --resume failed."""
    out, fast = tmp_path / "run", ("--workers", "0", "--ckpt-every", "2", "--train-vision")
    train.main(flags(packed, out, "--steps", "4", *fast))
    whole, weights = losses(out), final_weights(out)
    train.main(flags(packed, out, "--steps", "4", *fast, "--resume", train.checkpoint_dirs(str(out))[0]))
    assert losses(out) == whole
    again = final_weights(out)
    assert all(torch.equal(weights[k], again[k]) for k in weights)
    train.main(flags(packed, tmp_path / "frozen", "--steps", "4", "--workers", "0"))
    frozen = losses(tmp_path / "frozen")
    assert frozen[0] == whole[0] and frozen[-1] != whole[-1]  # same start; the tower did train


def test_vision_alone_loads_the_tower_and_keeps_the_random_llm(tmp_path):
    """--vision without --llm (the toy recipe's tower from filter.py train, say): the tower is the checkpoint's, the
    LLM the preset's at random; it was silently ignored (a random tower) before."""
    import model as M
    from checkpoints import random_vlm, write_hf_vision
    src = random_vlm(M.preset("tiny", 256), seed=3)
    path = write_hf_vision(tmp_path / "siglip", src)
    cfg = train.Config(vision=path, image_tokens=16)
    net, fresh = train.build_model(cfg, 256, torch.device("cpu")), train.build_model(train.Config(), 256, "cpu")
    tower = src.vision.state_dict()
    assert all(torch.equal(t, tower[k]) for k, t in net.vision.state_dict().items())
    assert all(torch.equal(t, fresh.llm.state_dict()[k]) for k, t in net.llm.state_dict().items())
    with pytest.raises(SystemExit, match="--llm needs --vision"):
        train.build_model(train.Config(llm=path), 256, torch.device("cpu"))
