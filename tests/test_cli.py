"""The newcomer's path (issue 14): every stage's --help lists each flag with its default and the comment of its
config field; a missing input is one line on stderr naming it, a non-zero exit, no traceback."""
import dataclasses
import inspect
import json
import os
import subprocess
import sys

import pytest

import eval as ev
import filter as fl
import model as M
import pack
import sft
import toyworld
import train
import weights

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HELP = [  # (argv of the stage's main, its config class)
    (train.main, [], train.Config), (sft.main, [], sft.Config), (pack.main, [], pack.PackConfig),
    (ev.main, [], ev.Config), (ev.main, ["chat"], ev.ChatConfig), (weights.main, ["export-hf"], weights.ExportConfig),
    (toyworld.main, None, toyworld.Config)] + [(fl.main, [cmd], cls) for cmd, (cls, _) in fl.COMMANDS.items()]


def comment(cls, name: str) -> str:
    """The comment ending field `name`'s line, read from the nearest class of cls's MRO that declares it."""
    for c in cls.__mro__[:-1]:
        for line in inspect.getsource(c).splitlines():
            if line.strip().startswith(name + ":") and "  # " in line:
                return line.split("  # ", 1)[1].strip()
    return ""


@pytest.mark.parametrize("main, argv, cls", HELP, ids=[f"{m.__module__} {' '.join(a or [])}".strip() for m, a, _ in HELP])
def test_help_lists_every_flag_with_default_and_comment(main, argv, cls, capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")  # one line per flag: no wrapping inside a comment
    with pytest.raises(SystemExit) as e:
        if argv is None:  # toyworld.main() reads sys.argv
            monkeypatch.setattr(sys, "argv", ["toyworld.py", "--help"])
            main()
        else:
            main(argv + ["--help"])
    assert e.value.code in (0, None)
    out = capsys.readouterr().out
    assert f"{cls.__name__}(" not in out  # not the dataclass's generated signature
    lines, key = {}, ""  # flag -> its entry: invocation, then help (on the next lines after a long invocation)
    for ln in out[out.index("options:"):].splitlines()[1:]:
        key = ln.split()[0] if ln.startswith("  -") else key
        lines[key] = lines.get(key, "") + " " + ln.strip()
    for f in dataclasses.fields(cls):
        flag, note = "--" + f.name.replace("_", "-"), comment(cls, f.name)
        assert note, f"{cls.__module__}.{cls.__name__}.{f.name} has no comment to show as its help"
        assert flag in lines, f"{flag} missing from {main.__module__} {argv} --help"
        line = lines[flag]
        if f.type in (bool, "bool"):
            assert f"{flag} / --no-{flag[2:]}" in line
        assert note in line and "(default: " in line, line


def test_help_shows_the_default_preset_values(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "10000")
    with pytest.raises(SystemExit):
        sft.main(["--help"])
    out = capsys.readouterr().out
    steps = next(ln for ln in out.splitlines() if ln.startswith("  --steps "))
    assert f"(default: {sft.PRESETS['tiny']['steps']})" in steps  # the tiny preset's, not the dataclass's 0


def missing_cases(tmp_path):
    """(script and argv, the path its error must name): every stage and filter subcommand given a missing input."""
    empty, shard, tok = tmp_path / "empty", tmp_path / "a.tar", tmp_path / "tokenizer.json"
    empty.mkdir()
    shard.touch()
    tok.write_text("{}")
    miss = str(tmp_path / "missing")
    return [
        (["train.py", "--data", miss], miss),
        (["sft.py", "--init", miss], miss),
        (["pack.py", "--input", miss, "--output", str(tmp_path / "out"), "--tokenizer", str(tok)], miss),
        (["eval.py", "--model", miss], miss),
        (["weights.py", "export-hf", miss, str(tmp_path / "hf")], miss),
        (["filter.py", "reshard", "--input", str(shard), "--uids", miss + ".npy", "--out", str(tmp_path / "r")],
         miss + ".npy"),
        # the same, in this process (SystemExit's message is what the interpreter prints, alone, on stderr)
        (["train.py", "--data", str(empty)], str(empty)),  # a dir that pack.py never finished (no stats.json)
        (["eval.py", "--model", str(empty)], str(empty)),  # no config.json: not a checkpoint
        (["eval.py", "compare", miss, str(empty)], miss),
        (["filter.py", "train", "--input", str(shard), "--tokenizer", miss, "--out", str(tmp_path / "t")], miss),
        (["filter.py", "score", "--input", str(shard), "--model", miss, "--out", str(tmp_path / "s")], miss),
        (["filter.py", "mlm", "--input", str(shard), "--model", miss, "--out", str(tmp_path / "m")], miss),
        (["filter.py", "select", "--uids", miss + ".npy", "--out", str(tmp_path / "k.npy")], miss + ".npy"),
    ]


SUBPROCESSES = 6  # one per script, as a newcomer runs it; started together, each mostly imports torch


def test_missing_inputs_are_one_line_errors(tmp_path, monkeypatch):
    """exit != 0, one stderr line that names the path, no traceback."""
    cases = missing_cases(tmp_path)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([sys.executable, os.path.join(REPO, argv[0]), *argv[1:]], cwd=tmp_path, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for argv, _ in cases[:SUBPROCESSES]]
    monkeypatch.chdir(tmp_path)
    mains = {"train.py": train.main, "sft.py": sft.main, "pack.py": pack.main, "eval.py": ev.main,
             "weights.py": weights.main, "filter.py": fl.main}
    for argv, path in cases[SUBPROCESSES:]:
        with pytest.raises(SystemExit) as e:
            mains[argv[0]](argv[1:])
        assert isinstance(e.value.code, str) and "\n" not in e.value.code and path in e.value.code, (argv, e.value)
    for (argv, path), p in zip(cases, procs):
        _, err = p.communicate(timeout=300)
        assert p.returncode != 0, argv
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1 and path in err, (argv, err)
    assert not os.path.exists(tmp_path / "out")  # pack refused before making its output dir


def test_wrong_checkpoints(tmp_path, capsys):
    """sft --init given train.py's run dir (its config.json is the run's, the model is in final/), and need()'s hub
    ids: an owner/name with no local owner dir is left to the loader, a local one is checked."""
    run = tmp_path / "runs" / "pretrain"
    run.mkdir(parents=True)
    (run / "config.json").write_text(json.dumps({"stage": "pretrain", "config": {}, "model": {}}))
    with pytest.raises(SystemExit) as e:
        sft.prepare(M.parse_config(sft.Config, ["--init", str(run)], sft.PRESETS), 0)
    assert f"{run}/final" in str(e.value.code) and "\n" not in str(e.value.code)
    assert M.need("no-such-owner/model", "", "config.json", hub=True) == "no-such-owner/model"
    with pytest.raises(SystemExit, match="run python train.py first"):
        M.need(str(tmp_path / "runs" / "x"), "run python train.py first", "config.json", hub=True)
    with pytest.raises(SystemExit, match="no config.json in it"):
        M.need(str(run.parent), "", "config.json")
