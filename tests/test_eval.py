"""eval.py: every scoring rule on cases read from the reference code (../shared/design/eval-rules.md), the TSV reader,
the prompts, decoding, compare's McNemar test, and whole runs (resume, error rows, 2 ranks == 1)."""
import base64
import io
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from PIL import Image

import eval as E
import model as M

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
torch.set_num_threads(1)  # tiny models on a shared CPU: a second thread costs more than it gives

# -----------------------------------------------------------------------------------------------------------------
# Rules


def test_rules_has_the_26_named_rules():
    want = ("vqa_harness_postprocess vqa_normalize vqa_accuracy textvqa_oq_score vqa_accuracy_vlmevalkit "
            "mc_correct_oq_substring mc_correct_oq_substring_cs mmbench_rowwise_oq mc_choice_extract mmbench_circular "
            "mmmu_parse_multi_choice mmmu_parse_multi_choice_official mmmu_parse_open mmmu_open mmmu_eval_multi_choice "
            "ai2d_correct_oq mathvista_correct_oq mathvista_extract_rule mathvista_normalize "
            "mathvista_correct_official pope_parse_oq pope_metrics_oq pope_parse_official pope_metrics "
            "pope_parse_vlmevalkit pope_metrics_vlmevalkit").split()
    assert len(want) == 26 and set(want) <= set(E.RULES) and all(callable(E.RULES[k]) for k in want)


def test_vqa_harness_postprocess_deletes_every_period_comma_and_newline():
    f = E.RULES["vqa_harness_postprocess"]
    assert f(generation="3.5") == "35" and f(generation="2.0") == "20"
    assert f(generation="Stop\nsign") == "stopsign"
    assert f(generation="Yes, A.<|endofchunk|>more") == "yes a"


def test_vqa_normalize_is_m4cs_processor():
    f = E.RULES["vqa_normalize"]
    assert f(answer="U.S.A.") == "usa"
    assert f(answer="3.5.") == "3.5"  # the broken lookbehind keeps the decimal point, drops the final one
    assert f(answer="Two Dogs") == "2 dogs" and f(answer="none") == "0"
    assert f(answer="the cat") == "cat" and f(answer="an apple") == "apple"
    assert f(answer="dont") == "don't" and f(answer="whats") == "what's"
    assert f(answer="Im") == "im"  # the contraction table is case-sensitive and the text is already lower-case
    assert f(answer="it's") == "it 's"  # word_tokenize splits 's
    assert f(answer="50% $3: ok") == "50% $3: ok"  # ':', '%', '$' untouched
    assert f(answer="coca-cola") == "coca cola" and f(answer="a - b") == "b"  # replaced, or deleted next to a space
    assert f(answer="Is it?") == "is it"


def test_vqa_accuracy_is_the_leave_one_out_soft_score():
    f = E.RULES["vqa_accuracy"]
    for matches, want in ((0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (10, 1.0)):
        assert f(prediction="Dog", gt_answers=["dog"] * matches + ["cat"] * (10 - matches)) == pytest.approx(want)


def test_vqa_accuracy_differs_from_vlmevalkit_where_the_reference_differs():
    m4c, vk = E.RULES["vqa_accuracy"], E.RULES["vqa_accuracy_vlmevalkit"]
    assert m4c(prediction="3.5.", gt_answers=["3.5"] * 10) == 1.0
    assert vk(prediction="3.5.", gt_answers=["3.5"] * 10) == 0.0
    assert m4c(prediction="hes", gt_answers=["he's"] * 10) == 0.0  # "he 's" vs "he's"
    assert vk(prediction="hes", gt_answers=["he's"] * 10) == 1.0
    assert vk(prediction="Two", gt_answers=["2"] * 3 + ["x"] * 7) == pytest.approx(0.9)


def test_textvqa_oq_score_scores_after_the_harness_stripping():
    f = E.RULES["textvqa_oq_score"]
    assert f(generation="3.5", gt_answers=["3.5"] * 10) == 0.0  # -> "35"
    assert f(generation="Dakota.", gt_answers=["dakota"] * 10) == 1.0


def test_oq_substring_rules_accept_what_the_harness_accepts():
    ci, cs = E.RULES["mc_correct_oq_substring"], E.RULES["mc_correct_oq_substring_cs"]
    assert ci(response="The answer is (B).", gt="A")  # the "a" of "answer"
    assert ci(response="I do not know", gt="D") and ci(response="b", gt="B")
    assert not ci(response="C.", gt="B")
    assert cs(response="B.", gt="B") and not cs(response="b", gt="B") and not cs(response="The answer", gt="A")
    rows = [{"prediction": "A.", "answer": "A"}, {"prediction": "B", "answer": "C"},
            {"prediction": "answer", "answer": "A"}, {"prediction": "c", "answer": "C"}]
    assert E.RULES["mmbench_rowwise_oq"](rows=rows) == 0.75


def test_mc_choice_extract_is_vlmevalkits_can_infer():
    f = E.RULES["mc_choice_extract"]
    abcd = {"A": "a red circle", "B": "a blue square", "C": "a green star", "D": "a black diamond"}
    assert f(response="B", choices=abcd) == "B" and f(response="(C) a green star.", choices=abcd) == "C"
    assert f(response="A dog is shown", choices={"A": "cat", "B": "dog"}) == "A"  # a lone article counts
    assert f(response="The answer is D", choices=abcd) == "D"
    assert f(response="Sorry, I can't help with images of people yet.", choices=abcd) == "Z"
    assert f(response="Z", choices=abcd) == "Z"
    assert f(response="b", choices=abcd) is False  # lower-case letters are not extracted
    assert f(response="A or B", choices=abcd) is False  # two letters
    assert f(response="B is what I would pick after looking at it", choices=abcd) is False  # not in the last 5 tokens
    assert f(response="B is surely it, since the correct answer is **B**", choices=abcd) == "B"  # then the regex
    assert f(response="it is a blue square", choices=abcd) == "B"  # option text
    assert f(response="x" * 200 + " blue square", choices=abcd) is False  # too long for the text step


def test_mmbench_circular_needs_every_rotation():
    opts = {"A": "cat", "B": "dog"}
    rows = [{"index": 0, "prediction": "A", "answer": "A", **opts},
            {"index": 1000000, "prediction": "A", "answer": "B", "A": "dog", "B": "cat"},
            {"index": 1, "prediction": "B", "answer": "B", **opts},
            {"index": 1000001, "prediction": "The answer is A", "answer": "A", "A": "dog", "B": "cat"}]
    got = E.RULES["mmbench_circular"](rows=rows)
    assert got == {"per_question_hit": {"0": 0, "1": 1}, "accuracy": 0.5}


def test_ai2d_argmax_with_ties_to_the_lower_index():
    f = E.RULES["ai2d_correct_oq"]
    assert f(mc_probabilities=[0.1, 0.4, 0.4, 0.1], ground_truth_answer=1)
    assert not f(mc_probabilities=[0.1, 0.4, 0.4, 0.1], ground_truth_answer=2)
    assert f(mc_probabilities=[0.1, 0.2, 0.3, 0.4], ground_truth_answer="3")


def test_mmmu_multi_choice_parsers_differ_as_the_reference_does():
    oq, off = E.RULES["mmmu_parse_multi_choice"], E.RULES["mmmu_parse_multi_choice_official"]
    ch, opts = ["A", "B", "C", "D"], {"A": "ribosome", "B": "nucleus", "C": "membrane", "D": "wall"}
    kw = dict(all_choices=ch, index2ans=opts)
    assert oq(response="the DNA is in the nucleus", **kw) == "A"  # "A " inside "DNA "
    assert off(response="the DNA is in the nucleus", **kw) == "B"  # " A " absent: > 5 tokens, option text
    assert oq(response="B.nucleus", **kw) == "B"  # "X." (OQ/lmms-eval only)
    assert oq(response="(A) or rather (C)", **kw) == "C" and off(response="(A) or rather (C)", **kw) == "C"
    assert off(response="I pick B here", **kw) == "B" and oq(response="B.", **kw) == "B"
    assert off(response="The answer: C.", **kw) == "C"
    r1, r2 = off(response="???", seed="42:7", **kw), off(response="???", seed="42:7", **kw)
    assert r1 == r2 and r1 in ch  # the fallback is seeded
    assert {off(response="no idea", seed=s, **kw) for s in range(40)} == set(ch)


def test_mmmu_open_parsing_and_eval():
    parse, ok = E.RULES["mmmu_parse_open"], E.RULES["mmmu_open"]
    assert set(parse(response="The answer is 1,000")) == {1000.0, 0.0}  # the spurious 000
    assert set(parse(response="x = 2.5")) == {2.5}
    assert set(parse(response="B")) == {" b", "b "}
    assert set(parse(response="so it is blue")) == {"blue"}  # the shortest tail after a key phrase
    assert ok(gold="cat", response="concatenate") and not ok(gold="dog", response="concatenate")
    assert ok(gold=["1.5", "3/2"], response="1.50") and not ok(gold="2.5", response="2.49")
    assert ok(gold="1.454", response="1.45")  # round(x, 2) on both sides
    em = E.RULES["mmmu_eval_multi_choice"]
    assert em(gold="A", pred="A") and not em(gold="A", pred="B") and em(gold=["A", "B"], pred="B")


def test_mathvista_oq_scores_everything_as_open():
    f = E.RULES["mathvista_correct_oq"]
    for out, want in (("B", True), ("b", True), ("B.", True), ("The answer is B", True), ("(B)", False)):
        assert f(model_output=out, ground_truth_answer="B", answer_type="text") is want, out
    assert f(model_output="1.454", ground_truth_answer="1.45", answer_type="float")
    assert f(model_output="$1.45", ground_truth_answer="1.45", answer_type="float")
    assert f(model_output="14 years", ground_truth_answer="14", answer_type="integer")


def test_mathvista_official_rules():
    ext, norm = E.RULES["mathvista_extract_rule"], E.RULES["mathvista_normalize"]
    ok = E.RULES["mathvista_correct_official"]
    mc = {"question_type": "multi_choice", "answer_type": "text", "choices": ["3", "4", "five"]}
    fi = {"question_type": "free_form", "answer_type": "integer", "choices": None}
    ff = {"question_type": "free_form", "answer_type": "float", "choices": None}
    assert ext(response="", problem=mc) == "" and ext(response="four", problem=mc) == "four"
    assert ext(response="five", problem=mc) == "five" and ext(response="7", problem=fi) == "7"
    assert ext(response="2.50", problem=ff) == "2.5" and ext(response='The answer is "12".', problem=fi) == "12"
    kw = dict(choices=mc["choices"], question_type="multi_choice", answer_type="text", precision=0)
    assert norm(extraction="(B) 4", **kw) == "4" and norm(extraction="C", **kw) == "five"
    assert norm(extraction="", **kw) == "3"  # Levenshtein-nearest: the shortest choice
    assert norm(extraction="fiv", **kw) == "five"
    assert norm(extraction="3.0", choices=None, question_type="free_form", answer_type="integer", precision=0) == "3"
    ff_kw = dict(choices=None, question_type="free_form", answer_type="float")
    assert norm(extraction="1.456", precision=2.0, **ff_kw) == "1.46"
    assert norm(extraction="abc", choices=None, question_type="free_form", answer_type="integer", precision=0) is None
    assert ok(response="B", problem=mc, answer="4", precision=0) and not ok(response="A", problem=mc, answer="4",
                                                                             precision=0)
    assert ok(response="2.50", problem=ff, answer="2.5", precision=1) and not ok(response="x", problem=ff, answer="2.5",
                                                                                   precision=1)


def test_pope_parsers():
    oq, off, vk = E.RULES["pope_parse_oq"], E.RULES["pope_parse_official"], E.RULES["pope_parse_vlmevalkit"]
    assert oq(response="Yes,") == "yes" and oq(response="no.") == "no" and oq(response="Yes, there is") is None
    for r, want in (("", "yes"), ("NO", "yes"), ("Nope", "yes"), ("I don't see one", "yes"),
                    ("No, there is not.", "no"), ("There is not a dog", "no"), ("Yes. But no", "yes")):
        assert off(response=r) == want, r
    assert vk(response="Yes") == "Yes" and vk(response="No.") == "No" and vk(response="yes and no") == "Unknown"
    assert vk(response="maybe") == "Unknown"


def test_pope_metrics():
    m = E.RULES["pope_metrics"](predictions=["Yes", "No", "yes", "no", "Yes"], labels=["yes", "yes", "no", "no", "yes"])
    assert (m["TP"], m["FP"], m["TN"], m["FN"]) == (2, 1, 1, 1)
    assert m["accuracy"] == 0.6 and m["precision"] == pytest.approx(2 / 3) and m["recall"] == pytest.approx(2 / 3)
    assert m["f1"] == pytest.approx(2 / 3) and m["yes_ratio"] == 0.6  # share of *predicted* yes
    v = E.RULES["pope_metrics_vlmevalkit"](predictions=["Yes", "maybe", "No"], labels=["Yes", "Yes", "No"])
    assert v["accuracy"] == pytest.approx(200 / 3) and v["precision"] == 100 and v["recall"] == 50
    assert v["f1"] == pytest.approx(100 * 2 / 3)
    o = E.RULES["pope_metrics_oq"](splits={"adversarial": {"model_outputs": ["Yes", "No,"], "labels": ["yes", "yes"]},
                                           "random": {"model_outputs": ["Yes, it is", "no"], "labels": ["no", "no"]}})
    assert o["POPE-adversarial-Accuracy"] == 0.5 and o["POPE-adversarial-F1"] == pytest.approx(2 / 3)
    assert o["POPE-random-Accuracy"] == 0.5 and o["POPE-random-F1"] == 0.0
    assert o["POPE-final-Accuracy"] == 0.5 and o["POPE-final-F1"] == pytest.approx(1 / 3)


# -----------------------------------------------------------------------------------------------------------------
# Reader and prompts


def b64_image(color=(200, 30, 30), size=16) -> str:
    buf = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buf, "PNG")
    return base64.b64encode(buf.getvalue()).decode()


def write_tsv(path, header, rows):
    with open(path, "w", newline="") as f:
        for r in [header] + rows:
            f.write("\t".join('"' + str(c).replace('"', '""') + '"' for c in r) + "\n")  # QUOTE_ALL, as VEK writes


def test_reader_handles_vlmevalkits_layout(tmp_path):
    img, img2 = b64_image(), b64_image((0, 0, 200))
    p = str(tmp_path / "MMBench_DEV_EN.tsv")
    write_tsv(p, ["index", "question", "hint", "A", "B", "C", "D", "answer", "category", "image"], [
        [0, "Which\tcolour?\nMultiline", "nan", "red", "blue", "None", "", "A", "color", img],
        [1000000, "Which\tcolour?\nMultiline", "nan", "blue", "red", "None", "", "B", "color", "0"],
        [1, "Q?", "A hint", "x", "y", "z", "w", "C", "c2", "7"],  # a back-reference to no row
        [2, "Q?", "", "x", "y", "NA", "N/A", "E", "c2", img2],  # answer not an option
        [3, "Q?", "", "x", "y", "", "", "A", "c2", "[" + img + ", " + img2 + "]"],  # unparsable list
    ])
    items = E.load_bench("mmbench", p)
    assert [it["id"] for it in items] == ["0", "1000000", "1", "2", "3"]
    a, b = items[0], items[1]
    assert a["error"] is None and a["question"] == "Which\tcolour?\nMultiline" and a["hint"] is None
    assert a["options"] == {"A": "red", "B": "blue"} and a["images"] == [img]  # "None" and "" are missing options
    assert b["images"] == [img] and b["answer"] == "B"  # the back-reference resolved
    assert "back-reference '7'" in items[2]["error"] and "MMBench_DEV_EN.tsv index 1" in items[2]["error"]
    assert "not an option" in items[3]["error"] and "unparsable image" in items[4]["error"]


def test_reader_multi_image_lists_answers_and_categories(tmp_path):
    img, img2 = b64_image(), b64_image((0, 0, 200))
    p = str(tmp_path / "MMMU_DEV_VAL.tsv")
    write_tsv(p, ["index", "question", "A", "B", "answer", "category", "l2-category", "split", "image"], [
        [0, "Compare <image 2> and <image 1>.", "<image 1>", "<image 2>", "B", "Art", "Art_Theory", "validation",
         str([img, img2])],
        [1, "How many? <image 1>", "", "", "['3', 'three']", "Math", "Algebra", "validation", img],
        [2, "dev row", "a", "b", "A", "Math", "Algebra", "dev", img],
    ])
    items = E.load_bench("mmmu", p)
    assert [it["id"] for it in items] == ["0", "1"]  # validation only
    assert items[0]["images"] == [img, img2] and not items[0]["open"] and items[1]["open"]
    assert items[1]["gold"] == ["3", "three"]
    assert E.standard_prompt("mmmu", items[0]) == (
        "Question: Compare <image> and <image>.\nOptions:\nA. <image>\nB. <image>\n"
        "Please select the correct answer from the options above. \n", [1, 0, 0, 1])
    assert E.paper_prompt("mmmu", items[0]) == (
        "The following are multiple choice questions about  Art Theory.\n\nCompare <image>\n and <image>\n.\n"
        "A. <image>\n\nB. <image>\n" + E.MC_SUFFIX, [0, 1, 0, 1])  # OQ: in order, cycled
    assert E.paper_prompt("mmmu", items[1])[0] == ("The following are multiple choice questions about  Algebra.\n\n"
                                                   "How many? <image>\n\nAnswer the question using a single word or "
                                                   "phrase.\nAnswer:")
    t = str(tmp_path / "TextVQA_VAL.tsv")
    write_tsv(t, ["index", "image", "question", "answer"], [[0, img, "what is written?", str(["stop"] * 9 + ["go"])]])
    assert E.load_bench("textvqa", t)[0]["answers"] == ["stop"] * 9 + ["go"]
    q = str(tmp_path / "POPE.tsv")
    write_tsv(q, ["index", "question", "answer", "category", "image"],
              [[0, "Is there a cat?", "Yes", "popular,random", img], [1, "Is there a dog?", "No", "adversarial", "0"]])
    pope = E.load_bench("pope", q)
    assert pope[0]["splits"] == ["popular", "random"] and pope[1]["splits"] == ["adversarial"]
    assert pope[1]["images"] == [img] and pope[1]["error"] is None


MC_ITEM = {"id": "5", "question": "What colour?", "hint": "Look closely.", "options": {"A": "red", "B": "blue"},
           "answer": "A", "images": ["x" * 100], "category": "c"}


def test_prompts_paper_style_are_the_harness_strings():
    p = E.paper_prompt
    assert p("mmbench", MC_ITEM) == ("<image>\nWhat colour?\nA. red\nB. blue\nC. None\nD. None\nAnswer with the "
                                     "option's letter from the given choices directly.\nAnswer:", [0])  # hint dropped
    assert p("seedbench", MC_ITEM) == p("ai2d", MC_ITEM) == p("realworldqa", MC_ITEM) == p("mmbench", MC_ITEM)
    assert p("mmstar", MC_ITEM)[0] == ("<image>\nQuestion: What colour?\nAnswer with the option's letter from the "
                                       "given choices directly.\nAnswer:")
    vqa = {"question": "what is written?", "images": ["x"]}
    assert p("textvqa", vqa)[0] == p("pope", vqa)[0] == ("<image>\nQuestion: what is written?\nAnswer the question "
                                                          "using a single word or phrase.\nAnswer:")
    mv = {"question": "Hint: Please answer.\nQuestion: Which is bigger?\nChoices:\n(A) 3\n(B) 4", "images": ["x"],
          "problem": {"question_type": "multi_choice", "choices": ["3", "4"], "answer_type": "text"}}
    assert p("mathvista", mv)[0] == "<image>\nWhich is bigger?\nA. 3\nB. 4" + E.MC_SUFFIX
    mv2 = {"question": "Hint: x\nQuestion: How many?", "images": ["x"],
           "problem": {"question_type": "free_form", "choices": None, "answer_type": "integer"}}
    assert p("mathvista", mv2)[0] == "<image>\nHow many?" + E.VQA_SUFFIX
    muir = {**MC_ITEM, "question": "Which has more circles? <image> or <image>", "images": ["x", "y"]}
    assert p("muirbench", muir) == ("Which has more circles? <image> or <image>\nA. red\nB. blue\nC. None\nD. None" +
                                    E.MC_SUFFIX, [0, 1])


def test_prompts_standard_style_are_vlmevalkits():
    s = E.standard_prompt
    want = ("<image>\nHint: Look closely.\nQuestion: What colour?\nOptions:\nA. red\nB. blue\n"
            "Please select the correct answer from the options above. \n", [0])
    for b in ("mmbench", "seedbench", "mmstar", "ai2d", "realworldqa"):
        assert s(b, MC_ITEM) == want
    assert s("mmbench", {**MC_ITEM, "hint": None})[0].startswith("<image>\nQuestion: ")
    assert s("textvqa", {"question": "what?", "images": ["x"]})[0] == ("<image>\nwhat?\nAnswer the question using a "
                                                                       "single word or phrase.")
    assert s("pope", {"question": "Is there a cat?", "images": ["x"]})[0] == "<image>\nIs there a cat?"
    assert s("mathvista", {"question": "Hint: h\nQuestion: q", "images": ["x"]})[0] == "<image>\nHint: h\nQuestion: q"
    muir = {**MC_ITEM, "question": "Which? <image> <image>", "images": ["x", "y"]}
    assert s("muirbench", muir) == ("Which? <image> <image>\nA. red\nB. blue\nAnswer with the option's letter from the "
                                    "given choices directly.", [0, 1])
    with pytest.raises(ValueError, match="placeholders"):
        s("muirbench", {**muir, "images": ["x"]})


# -----------------------------------------------------------------------------------------------------------------
# compare


def write_run(root, style, bench, outcomes, scores=None):
    d = os.path.join(root, style, bench)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "samples.jsonl"), "w") as f:
        for k, (i, c) in enumerate(outcomes):
            row = {"benchmark": bench, "style": style, "id": str(i), "correct": c, "error": None}
            if scores:
                row["score"] = scores[k]
            f.write(json.dumps(row) + "\n")


def test_compare_exact_mcnemar_and_chi2(tmp_path, capsys):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    # 5 both, 1 only A, 9 only B, 3 neither: exact p = 2 * P(X <= 1 | n=10) = 22 / 1024; chi2 = (8 - 1)^2 / 10
    pat = [(1, 1)] * 5 + [(1, 0)] + [(0, 1)] * 9 + [(0, 0)] * 3
    write_run(a, "paper", "pope", [(i, bool(x)) for i, (x, _) in enumerate(pat)])
    write_run(b, "paper", "pope", [(i, bool(y)) for i, (_, y) in enumerate(pat)])
    # standard MMBench: question 0 right in A only if both rotations are
    write_run(a, "standard", "mmbench", [(0, True), (1000000, False), (1, True), (1000001, True)])
    write_run(b, "standard", "mmbench", [(0, True), (1000000, True), (1, False), (1000001, True)])
    E.main(["compare", a, b, "--json"])
    res = json.loads(capsys.readouterr().out)
    t = res["paper"]["pope"]
    assert set(t) == {"n", "both", "only_a", "only_b", "neither", "statistic", "p_exact", "chi2", "p_chi2"}
    assert (t["n"], t["both"], t["only_a"], t["only_b"], t["neither"], t["statistic"]) == (18, 5, 1, 9, 3, 1)
    assert t["p_exact"] == pytest.approx(22 / 1024) and t["chi2"] == pytest.approx(4.9)
    assert t["p_chi2"] == pytest.approx(0.026856695507524, rel=1e-9)  # scipy.stats.chi2.sf(4.9, 1)
    m = res["standard"]["mmbench"]
    assert (m["n"], m["both"], m["only_a"], m["only_b"], m["neither"]) == (2, 0, 1, 1, 0) and m["p_exact"] == 1.0
    assert E.mcnemar(0, 0) == {"statistic": 0, "p_exact": 1.0, "chi2": 0.0, "p_chi2": 1.0}
    assert E.compare(a, b, "paper").keys() == {"paper"}
    E.main(["compare", a, b, "--style", "paper"])
    assert "McNemar exact p 0.02148" in capsys.readouterr().out


# -----------------------------------------------------------------------------------------------------------------
# Whole runs on a tiny random model


@pytest.fixture(scope="module")
def tiny_model(toy_world, tmp_path_factory):
    d = str(tmp_path_factory.mktemp("tiny") / "model")
    tok = M.Tokenizer(os.path.join(toy_world, "tokenizer.json"))
    net = M.VLM(M.preset("tiny", vocab_size=len(tok))).init_weights(seed=3)
    net.save_pretrained(d)
    shutil.copyfile(os.path.join(toy_world, "tokenizer.json"), os.path.join(d, "tokenizer.json"))
    return d


@pytest.fixture(scope="module")
def small_data(tmp_path_factory):
    """A few rows of four benchmarks in VLMEvalKit's layout, with one bad image and one missing answer."""
    d = tmp_path_factory.mktemp("data")
    imgs = [b64_image((30 * k, 200 - 20 * k, 90), 64) for k in range(6)]
    mm = []
    for q in range(5):
        opts = ["red", "blue", "green", "gray"]
        for k in range(4 if q != 2 else 2):
            o = opts[k:] + opts[:k] if q != 2 else ([opts[0], opts[1]] if k == 0 else [opts[1], opts[0]]) + ["", ""]
            mm.append([q + k * 1_000_000, f"What colour is shape {q}?", "", *o, "ABCD"[(0 - k) % (4 if q != 2 else 2)],
                       "color", imgs[q] if k == 0 else str(q)])
    mm.append([9, "Broken?", "", "a", "b", "", "", "A", "color", base64.b64encode(b"not an image" * 10).decode()])
    write_tsv(str(d / "MMBench_DEV_EN.tsv"), ["index", "question", "hint", "A", "B", "C", "D", "answer", "category",
                                               "image"], mm)
    write_tsv(str(d / "POPE.tsv"), ["index", "question", "answer", "category", "image"],
              [[k, f"Is there a {c} circle?", "Yes" if k % 2 else "No", "adversarial,popular" if k % 3 else "random",
                imgs[k % 6]] for k, c in enumerate(["red", "blue", "green", "pink", "black", "white"])])
    write_tsv(str(d / "TextVQA_VAL.tsv"), ["index", "image", "question", "answer"],
              [[k, imgs[k], "what word is written?", str(["cat"] * 10)] for k in range(4)] + [[4, imgs[0], "q", ""]])
    write_tsv(str(d / "MUIRBench.tsv"), ["index", "question", "A", "B", "answer", "category", "image"],
              [[k, "Which image has more circles? <image> <image>", "the first", "the second", "AB"[k % 2], "count",
                str([imgs[k], imgs[k + 1]])] for k in range(3)])
    return str(d)


def run_eval(model_dir, data, out, *extra):
    return E.main(["--model", model_dir, "--data", data, "--out", out, "--batch-size", "3", "--workers", "0", *extra])


def rows_of(out, style, bench):
    return E.read_jsonl(os.path.join(out, style, bench, "samples.jsonl"))


def test_run_writes_samples_and_results(tiny_model, small_data, tmp_path, capsys):
    out = str(tmp_path / "run")
    results = run_eval(tiny_model, small_data, out, "--bench", "mmbench,pope,textvqa,muirbench,ai2d")
    printed = capsys.readouterr().out
    assert "| mmbench | standard | accuracy *" in printed and "skipped ai2d" in printed and "AI2D_TEST.tsv" in printed
    saved = json.load(open(os.path.join(out, "results.json")))
    assert saved == results and os.path.isfile(os.path.join(out, "results.md"))
    keys = {"benchmark", "style", "metric", "score", "n", "n_error", "primary", "model", "data", "md5"}
    assert all(set(r) == keys and 0 <= r["score"] <= 1 for r in saved)
    prim = {(r["benchmark"], r["style"]): r for r in saved if r["primary"]}
    assert set(prim) == {(b, s) for b in ("mmbench", "pope", "textvqa", "muirbench") for s in ("paper", "standard")}
    assert prim["pope", "standard"]["metric"] == "f1" and prim["pope", "paper"]["metric"] == "accuracy"
    assert prim["mmbench", "standard"]["n"] == 6 and prim["mmbench", "paper"]["n"] == 19  # questions vs rows
    assert prim["mmbench", "paper"]["n_error"] == 1 and prim["textvqa", "standard"]["n_error"] == 1
    for style in ("paper", "standard"):
        rows = rows_of(out, style, "mmbench")
        assert len(rows) == 19 and len({r["id"] for r in rows}) == 19
        assert set(rows[0]) >= {"benchmark", "style", "id", "prompt", "output", "parsed", "correct", "category",
                                "error"}
        bad = [r for r in rows if r["id"] == "9"][0]
        assert bad["error"].startswith("MMBench_DEV_EN.tsv index 9: image") and bad["correct"] is False
        tv = rows_of(out, style, "textvqa")
        assert [r["error"] is not None for r in tv] == [False] * 4 + [True] and all("score" in r for r in tv[:4])
        assert all(r["correct"] == (r["score"] == 1.0) for r in tv[:4])
    paper = rows_of(out, "paper", "pope")
    assert all(r["prompt"].startswith("<image>\nQuestion: Is there") for r in paper)


def test_killed_run_resumes_without_recomputing(tiny_model, small_data, tmp_path, monkeypatch):
    full, cut = str(tmp_path / "full"), str(tmp_path / "cut")
    args = ("--bench", "mmbench,pope", "--style", "standard")
    run_eval(tiny_model, small_data, full, *args)
    run_eval(tiny_model, small_data, cut, *args)
    p = os.path.join(cut, "standard", "mmbench", "samples.jsonl")
    lines = open(p).readlines()
    with open(p, "w") as f:  # killed: 7 rows kept, the 8th half-written
        f.writelines(lines[:7] + [lines[7][:25]])
    seen = []
    orig = M.VLM.generate
    monkeypatch.setattr(M.VLM, "generate", lambda self, prompts, *a, **kw: seen.append(len(prompts)) or
                        orig(self, prompts, *a, **kw))
    res = run_eval(tiny_model, small_data, cut, *args)
    assert open(p).read() == open(os.path.join(full, "standard", "mmbench", "samples.jsonl")).read()
    kept = {json.loads(x)["id"] for x in lines[:7]}
    assert sum(seen) < 18 and sum(seen) >= 18 - len(kept - {"9"})  # only batches holding a missing row ran
    assert res == json.load(open(os.path.join(full, "results.json")))


def test_two_ranks_give_one_process_results(tiny_model, small_data, tmp_path):
    one, two = str(tmp_path / "one"), str(tmp_path / "two")
    args = ["--model", tiny_model, "--data", small_data, "--bench", "mmbench,muirbench", "--batch-size", "2",
            "--workers", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "eval.py", *args, "--out", one], cwd=REPO, env=env, check=True,
                   capture_output=True)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "eval.py", *args, "--out",
                        two], cwd=REPO, env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-3000:]
    for style in ("paper", "standard"):
        for b in ("mmbench", "muirbench"):
            assert open(os.path.join(one, style, b, "samples.jsonl")).read() == \
                open(os.path.join(two, style, b, "samples.jsonl")).read()
        assert not [f for f in os.listdir(os.path.join(two, style, "mmbench")) if "rank" in f]
    assert json.load(open(os.path.join(one, "results.json"))) == json.load(open(os.path.join(two, "results.json")))


class Scripted:
    """Stands in for the LLM: the logits of step k put all mass on script[k] (at the first step, on `first`)."""

    def __init__(self, vocab, script, first=None):
        self.vocab, self.script, self.first, self.calls = vocab, script, first, 0

    def __call__(self, input_ids=None, embeds=None, positions=None, attn=None, targets=None, cache=None,
                 last_only=False):
        x = embeds if embeds is not None else input_ids
        self.calls = 0 if cache is None or cache.length == 0 else self.calls  # a prefill starts the script
        if cache is not None:
            cache.length += x.shape[1]
        logits = torch.full((x.shape[0], 1, self.vocab), -30.0)
        if self.calls == 0 and self.first is not None:
            logits[:, 0, list(self.first)] = torch.tensor([float(v) for v in self.first.values()])
        else:
            logits[:, 0, self.script[min(self.calls, len(self.script) - 1)]] = 10.0
        self.calls += 1
        return logits


def test_paper_stops_at_the_stop_character_and_keeps_it(tiny_model, small_data, tmp_path, monkeypatch):
    tok = M.Tokenizer(os.path.join(tiny_model, "tokenizer.json"))
    script = tok.encode("B") + tok.encode(".") + tok.encode(" more")
    net = M.load_vlm(tiny_model)
    out = net.generate([[tok.bos_id, M.IMAGE_ID, 5]], torch.zeros(1, 3, 64, 64), 16, stop_ids=tok.encode("."),
                       keep_stop=True, callback=None)
    assert len(out[0]) >= 1
    net.llm.forward = Scripted(len(tok), script)
    got = net.generate([[tok.bos_id, M.IMAGE_ID, 5]] * 2, torch.zeros(2, 3, 64, 64), 16,
                       stop_ids=[tok.encode(c)[0] for c in ".,\n"], keep_stop=True)
    assert [tok.decode(g) for g in got] == ["B.", "B."]  # stopped at ".", and kept it
    net.llm.forward = Scripted(len(tok), script)
    got = net.generate([[tok.bos_id, 5]], None, 16, stop_ids=[tok.encode(".")[0]])
    assert tok.decode(got[0]) == "B"  # without keep_stop the stop id is dropped, as before
    monkeypatch.setattr(E, "load_model", lambda cfg, device: (load_scripted(tiny_model, script), tok, "qwen2", None))
    out = str(tmp_path / "run")
    run_eval(tiny_model, small_data, out, "--bench", "pope", "--style", "paper")
    assert {r["output"] for r in rows_of(out, "paper", "pope")} == {"B."}


def load_scripted(path, script, first=None):
    net = M.load_vlm(path)
    net.llm.forward = Scripted(net.config.llm.vocab_size, script, first)
    return net


def test_ai2d_paper_picks_the_letter_with_the_highest_renormalised_probability(tiny_model, small_data, tmp_path,
                                                                               monkeypatch):
    tok = M.Tokenizer(os.path.join(tiny_model, "tokenizer.json"))
    a, b, c, d = (tok.encode(x)[0] for x in "ABCD")
    other = tok.encode(" the")[0]  # the most likely token overall is not a letter: only the letters count
    first = {other: 9.0, a: 1.0, b: 2.0, c: 3.5, d: 0.5}
    src = os.path.join(small_data, "MMBench_DEV_EN.tsv")
    data = str(tmp_path / "data")
    os.makedirs(data)
    shutil.copyfile(src, os.path.join(data, "AI2D_TEST.tsv"))
    monkeypatch.setattr(E, "load_model", lambda cfg, device: (load_scripted(tiny_model, [other], first), tok, "qwen2",
                                                              None))
    out = str(tmp_path / "run")
    run_eval(tiny_model, data, out, "--bench", "ai2d", "--style", "paper")
    rows = [r for r in rows_of(out, "paper", "ai2d") if not r["error"]]
    e = torch.tensor([1.0, 2.0, 3.5, 0.5]).exp()
    assert all(r["output"] == "C" and r["probs"] == pytest.approx((e / e.sum()).tolist(), rel=1e-5) for r in rows)
    assert all(r["correct"] == (r["parsed"] == "C" and r["correct"]) for r in rows)
    answers = {it["id"]: it["answer"] for it in E.load_bench("ai2d", os.path.join(data, "AI2D_TEST.tsv"))}
    assert all(r["correct"] == (answers[r["id"]] == "C") for r in rows)


def test_release_style_cannot_hold_two_images_and_says_so_before_generating(tiny_model, small_data, tmp_path,
                                                                            monkeypatch):
    tok = M.Tokenizer(os.path.join(tiny_model, "tokenizer.json"))
    monkeypatch.setattr(E, "load_model", lambda cfg, device: (M.load_vlm(tiny_model), tok, "release", None))
    monkeypatch.setattr(M.VLM, "generate", lambda *a, **k: pytest.fail("generated"))
    with pytest.raises(SystemExit, match="muirbench .standard.: style='release' supports exactly one image"):
        run_eval(tiny_model, small_data, str(tmp_path / "r"), "--bench", "muirbench", "--style", "standard")


def test_chat_streams_the_greedy_answer(tiny_model, tmp_path, capsys):
    img = tmp_path / "a.png"
    Image.new("RGB", (64, 64), (200, 20, 20)).save(img)
    text = E.main(["chat", "--model", tiny_model, "--image", str(img), "--max-new-tokens", "6", "What is it?"])
    assert capsys.readouterr().out == text + "\n"
    net, tok = M.load_vlm(tiny_model), M.Tokenizer(os.path.join(tiny_model, "tokenizer.json"))
    ids = M.chat_tokens(tok, [{"from": "human", "value": "<image>\nWhat is it?"}], generation_prompt=True)[0]
    want = net.generate([ids], M.preprocess(str(img), 64)[None], 6, stop_ids=[tok.eos_id])[0]
    assert text == tok.decode(want)
    q, a = {"from": "human", "value": "Hi?"}, {"from": "gpt", "value": "Hello."}
    with pytest.raises(ValueError, match="generation_prompt"):
        M.chat_tokens(tok, [q, a], generation_prompt=True)
    gen = M.chat_tokens(tok, [q], generation_prompt=True)[0]
    assert M.chat_tokens(tok, [q, a])[0][:len(gen)] == gen  # the prompt a reply continues
    assert tok.decode(gen).endswith("assistant\n")
    assert "Be brief." in tok.decode(M.chat_tokens(tok, [q], system="Be brief.", generation_prompt=True)[0])
