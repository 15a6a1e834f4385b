"""speedrun.sh end to end on a small toy world, everything shrunk by flags (it checks the plumbing, not accuracy):
every stage runs, each one's output is the next one's input, the results table is written; a rerun skips the
finished stages and resumes the others; the first failing stage stops the run with its error. And bench/plot.py
draws the two loss curves of that run."""
import importlib.util
import json
import os
import subprocess
import sys
import xml.etree.ElementTree as ET

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STAGES = ["toyworld.py", "filter.py train", "filter.py score", "filter.py select", "filter.py reshard", "pack.py",
          "train.py", "sft.py", "eval.py"]
# the smallest run that still exercises every stage: the conftest world, a few steps, 256-token rows (pack.py gets
# its row shape from train.py's flags), 4 rows a step, 4 questions per benchmark and 4 new tokens
SMALL = {"WORLD_FLAGS": "--n-pool 600 --n-sft 200 --n-eval 60 --shard-size 200",
         "FILTER_FLAGS": "--steps 2 --batch-size 16", "SCORE_FLAGS": "--workers 0 --batch-size 200",
         "RESHARD_FLAGS": "--shard-size 200 --workers 1", "PACK_FLAGS": "--workers 1",
         "TRAIN_FLAGS": "--steps 2 --global-batch 4 --micro-batch 4 --seq-len 256 --workers 0",
         "SFT_FLAGS": "--steps 2 --global-batch 4 --micro-batch 4 --seq-len 256 --workers 0 --prep-workers 1",
         "EVAL_FLAGS": "--limit 4 --max-new-tokens 4 --workers 0"}


def speedrun(tmp, **env):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "2", "WORLD": str(tmp / "world"),
           "RUNS": str(tmp / "runs"), **SMALL, **env}
    return subprocess.run(["bash", os.path.join(REPO, "speedrun.sh")], cwd=tmp, env=env, capture_output=True,
                          text=True, timeout=900)


def status(out: str) -> dict:
    """stage name -> "ran" | "skipped", from speedrun's one line per stage."""
    got = {}
    for line in out.splitlines():
        name = next((s for s in sorted(STAGES, key=len, reverse=True) if line.startswith(s + " ")), None)
        if name:
            got[name] = "skipped" if "skipped: complete" in line else "failed" if "FAILED" in line else "ran"
    return got


def load(path):
    with open(path) as f:
        return json.load(f)


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("speedrun")
    p = speedrun(tmp)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    return tmp, p.stdout


def test_every_stage_feeds_the_next(run):
    tmp, out = run
    w, r = tmp / "world", tmp / "runs"
    assert status(out) == dict.fromkeys(STAGES, "ran"), out
    pool = sorted(p.name for p in (w / "pool").glob("*.tar"))
    # score: one line per sample of every world shard, scored with the SigLIP filter.py train wrote
    assert load(r / "filter/scores/settings.json")["model"] == str(r / "filter/siglip")
    assert sorted(p.name for p in (r / "filter/scores").glob("*.jsonl")) == [n[:-4] + ".jsonl" for n in pool]
    lines = [json.loads(s) for f in sorted((r / "filter/scores").glob("*.jsonl")) for s in open(f)]
    assert len(lines) == load(w / "manifest.json")["pool"]["samples"]
    # select -> reshard -> pack: the kept uids are what the filtered pool holds, and all that pack.py read
    keep = np.load(r / "filter/keep.npy")
    assert 0 < len(keep) == load(r / "filter/keep.json")["kept"] < len(lines)
    reshard = load(r / "filter/pool/stats.json")
    assert reshard["seen"] == len(lines) and reshard["kept"] == len(keep)
    packed = load(r / "packed/stats.json")
    assert packed["samples_in"] == len(keep) and (packed["seq_len"], packed["image_tokens"]) == (256, 16)
    # train -> sft -> eval
    pre = load(r / "pretrain/config.json")
    assert pre["config"]["data"] == str(r / "packed") and pre["data"] == packed and pre["stage"] == "pretrain"
    sft = load(r / "sft/config.json")
    assert sft["config"]["init"] == str(r / "pretrain/final") and sft["stage"] == "sft"
    assert sft["config"]["data"] == [str(w / "sft/sft.json")]
    for d in ("pretrain", "sft"):
        assert [json.loads(s)["step"] for s in open(r / d / "metrics.jsonl")] == [1, 2]
        assert (r / d / "final/model.safetensors").is_file() and (r / d / "final/tokenizer.json").is_file()
    results = load(r / "eval/results.json")
    assert {x["model"] for x in results} == {str(r / "sft/final")}
    assert all(os.path.dirname(x["data"]) == str(w / "eval") for x in results)
    assert {x["style"] for x in results} == {"paper", "standard"}
    assert {x["benchmark"] for x in results} == {"mmbench", "pope", "textvqa", "muirbench"}
    table = (r / "eval/results.md").read_text()
    assert out.rstrip().endswith(table.rstrip())  # it ends with the results table
    assert sorted(p.name for p in (r / "logs").glob("*.log")) == sorted(
        ["toyworld.log", "filter-train.log", "filter-score.log", "filter-select.log", "filter-reshard.log",
         "pack.log", "train.log", "sft.log", "eval.log"])


def test_plot_draws_both_loss_curves(run, tmp_path):
    tmp, _ = run
    spec = importlib.util.spec_from_file_location("bench_plot", os.path.join(REPO, "bench", "plot.py"))
    plot = sys.modules[spec.name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plot)
    files = [str(tmp / "runs" / d / "metrics.jsonl") for d in ("pretrain", "sft")]
    plot.main([*files, "--out", str(tmp_path / "loss.svg")])
    svg = ET.parse(tmp_path / "loss.svg").getroot()
    curves = [e for e in svg.iter() if e.tag.endswith("polyline")]
    assert len(curves) == 2 and all(len(c.get("points").split()) == 2 for c in curves)
    text = " ".join(e.text or "" for e in svg.iter() if e.tag.endswith("text"))
    assert "pretrain" in text and "sft" in text


def test_rerun_skips_finished_stages_and_resumes_the_rest(run):
    """Run after the first: with pretrain/final gone, train.py alone runs again, resumes from its last checkpoint
    (step 2 of 2: nothing left to train) and writes final/ again; every other stage is skipped."""
    tmp, _ = run
    r = tmp / "runs"
    before = {p: p.stat().st_mtime_ns for p in r.rglob("*") if p.is_file() and "pretrain" not in p.parts and
              p.name != "train.log"}
    final = r / "pretrain/final"
    weights = (final / "model.safetensors").read_bytes()
    for f in final.iterdir():
        f.unlink()
    final.rmdir()
    p = speedrun(tmp)
    assert p.returncode == 0, p.stdout[-4000:] + p.stderr[-4000:]
    assert status(p.stdout) == {**dict.fromkeys(STAGES, "skipped"), "train.py": "ran"}, p.stdout
    assert "resumed from" in (r / "logs/train.log").read_text()
    assert (final / "model.safetensors").read_bytes() == weights
    assert {p: p.stat().st_mtime_ns for p in before} == before  # nothing else was written
    assert p.stdout.rstrip().endswith((r / "eval/results.md").read_text().rstrip())


def test_stops_at_the_first_failing_stage(run, tmp_path):
    tmp, _ = run  # the finished world is reused; the filter's first stage gets a flag it does not know
    p = speedrun(tmp_path, WORLD=str(tmp / "world"), FILTER_FLAGS="--no-such-flag")
    assert p.returncode != 0
    assert status(p.stdout) == {"toyworld.py": "skipped", "filter.py train": "failed"}, p.stdout
    assert "--no-such-flag" in p.stdout.splitlines()[-2]  # argparse's one line, then where the whole log is
    assert not (tmp_path / "runs/filter/scores").exists()


def test_refuses_a_run_dir_made_from_other_data(run):
    """A finished runs/pretrain made by hand (`python train.py` trains on the unfiltered pool) is not taken for the
    speedrun's: it stops before train.py, naming the dir."""
    tmp, _ = run
    cfg = tmp / "runs/pretrain/config.json"
    saved = cfg.read_text()
    c = json.loads(saved)
    c["config"]["data"] = str(tmp / "world/packed-512-16")
    cfg.write_text(json.dumps(c, indent=1))
    try:
        p = speedrun(tmp)
    finally:
        cfg.write_text(saved)
    assert p.returncode == 1 and "train.py" not in status(p.stdout), p.stdout
    assert f"{tmp / 'runs/pretrain'} holds a run with another --data" in p.stderr
