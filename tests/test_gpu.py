"""The GPU path, as far as a CPU can see it: bench/gpu.py --smoke gives a number for every section, and the fixes
of the GPU review (../shared/design/gpu-review.md) that do not need CUDA to be checked."""
import importlib.util
import json
import os
import subprocess
import sys

import pytest
import torch
from torch._dynamo.utils import counters

import model as M

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(REPO, "bench", "gpu.py"))
    mod = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def test_smoke_gives_a_number_for_every_section(tmp_path):
    p = subprocess.run([sys.executable, os.path.join(REPO, "bench", "gpu.py"), "--smoke", "--out", str(tmp_path)],
                       cwd=REPO, capture_output=True, text=True, timeout=1800,
                       env={**os.environ, "OMP_NUM_THREADS": "2"})
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert os.listdir(tmp_path) == ["summary.json"]  # nothing large in the results folder
    for name in load_bench().SECTIONS:
        res = summary[name]
        assert "error" not in res, (name, res["error"])
        numbers = {k: v for k, v in res.items() if k != "seconds" and isinstance(v, float)}
        assert numbers, f"section {name} measured nothing: {res}"
    par = summary["parity"]
    assert par["fp32_out_rel"] < 1e-4 and par["bf16_err_ratio"] <= 2 and par["attention_ok"] == 1
    assert par["model_loss_rel_flex_docs"] < 1e-4 and par["recompiles_new_docs"] == 0 and par["graph_breaks"] == 0
    assert summary["throughput"]["doc_mask_ac.tok_s"] > 0 and summary["compiled"]["compiled_doc_mask_ac.tok_s"] > 0
    assert summary["env"]["allreduce_ok"] == 1


def test_the_check_imports_nothing_that_imports_webdataset():
    code = ("import sys; sys.modules['webdataset'] = None; sys.path.insert(0, 'bench'); "
            "import gpu, pack, toyworld, train, sft, eval, filter, weights")  # the GPU machine has no webdataset
    p = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr


@pytest.fixture
def fresh_flex(monkeypatch):
    """As at process start: flex and create_block_mask not compiled yet."""
    monkeypatch.setattr(M, "_flex", None)
    monkeypatch.setattr(M, "_create_block_mask", None)


def test_block_mask_creation_is_compiled_once(fresh_flex):
    """gpu-review 5: eager create_block_mask materialises the dense B x T x T mask."""
    from torch.nn.attention.flex_attention import create_block_mask
    a = M.make_attention([[100, 156], [256]], "cpu", "flex")
    compiled = M._create_block_mask
    assert compiled is not create_block_mask and hasattr(compiled, "_torchdynamo_orig_callable")
    frames = counters["frames"]["total"]
    b = M.make_attention([[30, 200, 26], [128, 128]], "cpu", "flex")  # a fresh closure over a fresh doc tensor
    assert M._create_block_mask is compiled and counters["frames"]["total"] == frames  # no recompile
    doc = torch.tensor([[0] * 30 + [1] * 200 + [2] * 26, [0] * 128 + [1] * 128])
    eager = create_block_mask(lambda b, h, q, kv: (doc[b, q] == doc[b, kv]) & (q >= kv), 2, None, 256, 256, device="cpu")
    assert torch.equal(b.block_mask.to_dense(), eager.to_dense())
    assert not torch.equal(a.block_mask.to_dense(), b.block_mask.to_dense())


def test_compiled_block_with_flex_does_not_recompile(fresh_flex):
    """gpu-review 6: a compiled flex first created inside a compiled block made every block recompile. (Only the
    compiles are checked: on a CPU, torch 2.13's Inductor flex gives wrong outputs when the keys are computed in the
    same graph, as RoPE's are; bench/gpu.py's parity section compares compiled and eager on CUDA.)"""
    torch.manual_seed(0)
    c = M.QwenConfig(256, 64, 128, 1, 4, 2, 16, 1e4)
    block = M.QwenBlock(c)
    x = torch.randn(2, 256, 64)
    cos, sin = M.rope(torch.arange(256).expand(2, 256), 16, 1e4, x.dtype)
    block.compile()
    with torch.no_grad():  # flex has no backward on a CPU
        block(x, cos, sin, M.make_attention([[100, 156], [256]], "cpu", "flex"))
        frames, graphs = counters["frames"]["total"], counters["stats"]["unique_graphs"]
        block(x, cos, sin, M.make_attention([[30, 200, 26], [128, 128]], "cpu", "flex"))  # new documents
    assert frames >= 1 and (counters["frames"]["total"], counters["stats"]["unique_graphs"]) == (frames, graphs)


def test_masked_gqa_on_cuda_repeats_kv_heads(monkeypatch):
    """gpu-review 7: on CUDA, SDPA with a mask and enable_gqa runs the math kernel; the CUDA branch (simulated on
    the CPU) repeats the KV heads instead, in attend and in generate's left-padded prefill and decode steps."""
    calls, sdpa = [], M.F.scaled_dot_product_attention

    def spy(q, k, v, attn_mask=None, **kw):
        calls.append((q.shape[1], k.shape[1], attn_mask is not None, kw.get("enable_gqa", False)))
        return sdpa(q, k, v, attn_mask=attn_mask, **kw)

    torch.manual_seed(0)
    q, k, v = torch.randn(2, 6, 32, 16), torch.randn(2, 1, 32, 16), torch.randn(2, 1, 32, 16)
    attn = M.make_attention([[10, 22], [32]], "cpu", "mask")
    want = M.attend(q, k, v, attn)
    c = M.preset("tiny", vocab_size=256)
    net = M.VLM(c).init_weights(0).eval()
    prompts = [[1, M.IMAGE_ID, 5, 6, 7], [1, M.IMAGE_ID, 9]]  # different lengths: left padding, masked attention
    px = torch.randn(2, 3, 64, 64)
    want_tokens = net.generate(prompts, px, max_new_tokens=4)
    monkeypatch.setattr(M, "MASKED_GQA_IS_MATH", {"cpu"})
    monkeypatch.setattr(M.F, "scaled_dot_product_attention", spy)
    torch.testing.assert_close(M.attend(q, k, v, attn), want, atol=1e-6, rtol=1e-5)
    assert calls == [(6, 6, True, False)]
    calls.clear()
    assert net.generate(prompts, px, max_new_tokens=4) == want_tokens
    llm_calls = [cl for cl in calls if cl[2]]  # the LLM's masked calls (SigLIP's are unmasked, without GQA)
    assert llm_calls and all(hq == hkv and not gqa for hq, hkv, _, gqa in llm_calls)


def test_short_flex_queries_at_a_group_of_6_force_the_main_kernel(monkeypatch):
    """gpu-review 8: flex's decoding kernel (under 128 queries) needs a power-of-2 number of query heads per KV
    head; Qwen2.5-1.5B has 6."""
    seen = []
    monkeypatch.setattr(M, "_flex", lambda q, k, v, **kw: seen.append(kw["kernel_options"]) or q)
    attn = M.Attention("flex", block_mask=object())
    for hq, hkv, t in ((12, 2, 64), (12, 2, 128), (8, 2, 64), (12, 2, 4096)):
        M.attend(torch.zeros(1, hq, t, 8), torch.zeros(1, hkv, t, 8), torch.zeros(1, hkv, t, 8), attn)
    assert seen == [{"FORCE_USE_FLEX_ATTENTION": True}, None, None, None]
