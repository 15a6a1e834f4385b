"""
Evaluation (reference.md §5, ../shared/design/eval-rules.md, formats.md §1): the paper's eight benchmarks plus
RealWorldQA and MUIRBench from VLMEvalKit's TSVs, generated with the KV cache and scored two ways, named in every
result: `paper` = the Open-Qwen2VL harness (raw prompts, 16 greedy tokens stopping at "." "," "\\n", substring
matching); `standard` = the benchmarks' own rules (chat prompts, VLMEvalKit's prompts, circular MMBench).

    python eval.py                                   # runs/sft/final on the toy world's sets, both styles
    python eval.py --model runs/sft/final --data ~/LMUData --bench mmbench,pope --style standard --limit 200
    torchrun --nproc_per_node=8 eval.py --model DIR --data ~/LMUData   # same results as one process
    python eval.py compare runs/eval_a runs/eval_b [--style standard] [--json]   # McNemar per benchmark
    python eval.py chat --model DIR --image a.jpg [--image b.jpg] "What is in the image?"

Every scoring rule is a plain function in RULES, called with the keyword arguments eval-rules.md gives.
"""
from __future__ import annotations

import ast
import base64
import csv
import functools
import hashlib
import io
import json
import math
import os
import random
import re
import string
import sys
import time
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
import torch.distributed as dist

import model as M
import weights
from train import print0, setup

# TextVQA / VQA (eval-rules §1). m4c's EvalAIAnswerProcessor (= lmms-eval) and VLMEvalKit's process_answer differ in
# two places: m4c splits "'s" off (word_tokenize) and its period regex has a broken lookbehind.

# The VQA contraction table, written as its values: each key is a value with one apostrophe dropped ("dont",
# "couldnt've" and "couldn'tve"). Its two identity entries (let's, she's) change nothing; one entry is backwards.
CONTRACTIONS = {v[:i] + v[i + 1:]: v for v in """ain't aren't can't could've couldn't couldn't've didn't doesn't don't
hadn't hadn't've hasn't haven't he'd he'd've he's how'd how'll how's I'd've I'm I've isn't it'd it'd've it'll ma'am
mightn't mightn't've might've mustn't must've needn't not've o'clock oughtn't 'ow's'at shan't she'd've should've
shouldn't shouldn't've somebody'd've somebody'll somebody's someone'd someone'd've someone'll someone's something'd
something'd've something'll that's there'd there'd've there're there's they'd they'd've they'll they're they've 'twas
wasn't we'd've we've weren't what'll what're what's what've when's where'd where's where've who'd who'd've who'll
who's who've why'll why're why's won't would've wouldn't wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll
you're you've""".split() for i, ch in enumerate(v) if ch == "'"} | {"somebody'd": "somebodyd"}
NUMBERS = dict(zip("none zero one two three four five six seven eight nine ten".split(), ["0", *map(str, range(11))]))
PUNCT = list(';/[]"{}()=+\\_-><@`,?!')
PERIOD_M4C = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, so "3.5." -> "3.5"
PERIOD_VK = re.compile(r"(?<!\d)\.(?!\d)")

def _punctuation(text: str, period: re.Pattern, comma: str) -> str:
    out = text
    for p in PUNCT:
        out = out.replace(p, "" if (p + " " in text or " " + p in text or re.search(comma, text)) else " ")
    return period.sub("", out, re.UNICODE)  # sic: re.UNICODE (32) lands in `count`

def _digits_articles(text: str) -> str:
    words = [NUMBERS.get(w, w) for w in text.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in ("a", "an", "the"))

def vqa_normalize(answer: str) -> str:
    """m4c EvalAIAnswerProcessor (OQ util/evaluation/textvqa/m4c_evaluators.py = lmms-eval's)."""
    answer = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's").strip()
    answer = answer.replace("\n", " ").replace("\t", " ").strip()
    return _digits_articles(_punctuation(answer, PERIOD_M4C, r"(?<=\d)(\,)+(?=\d)"))

def _vqa_soft(pred: str, gts: list[str]) -> float:
    """Mean over leave-one-out subsets of min(1, matches / 3) ("10 choose 9")."""
    return sum(min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))) / len(gts)

def vqa_accuracy(prediction: str, gt_answers: list[str]) -> float:
    """m4c TextVQAAccuracyEvaluator: prediction and every GT through vqa_normalize."""
    return _vqa_soft(vqa_normalize(prediction), [vqa_normalize(a) for a in gt_answers])

def _vk_answer(a: str) -> str:
    return _digits_articles(_punctuation(a.replace("\n", " ").replace("\t", " ").strip(), PERIOD_VK, r"(\d)(,)(\d)"))

def vqa_accuracy_vlmevalkit(prediction: str, gt_answers: list[str]) -> float:
    """VLMEvalKit dataset/utils/vqa_eval.py process_answer + process_line(vqa_score): no "'s" split, fixed regex."""
    return _vqa_soft(_vk_answer(prediction), [_vk_answer(a) for a in gt_answers])

def vqa_harness_postprocess(generation: str) -> str:
    """OQ harnesses' output expression: deletes every "\\n", "." and "," (so "3.5" -> "35")."""
    return generation.replace("\n", "").replace(".", "").replace(",", "").lower().split("<|endofchunk|>")[0]

def textvqa_oq_score(generation: str, gt_answers: list[str]) -> float:
    return vqa_accuracy(prediction=vqa_harness_postprocess(generation), gt_answers=gt_answers)

# Multiple choice (eval-rules §4-6, 8): OQ's substring tests and VLMEvalKit's can_infer.
REFUSALS = ("Sorry, I can't help with images of people yet.", "I can't process this file.",
            "I'm sorry, but without the image provided", "Cannot determine the answer")
ANSWER_IS = re.compile(r"(?i)(?:correct\s+)?answer\s+is\s+\**([ABCD])\**")

def mc_correct_oq_substring(response: str, gt: str) -> bool:
    return gt.lower() in response.lower()  # sic: GT "A" matches "The answer is (B)." through "answer"

def mc_correct_oq_substring_cs(response: str, gt: str) -> bool:
    return gt in response

def mc_choice_extract(response: str, choices: dict):
    """VLMEvalKit can_infer (option, then text): a letter, "Z" (refusal) or False (none: wrong under exact matching)."""
    response = str(response)
    if any(r in response for r in REFUSALS):
        return "Z"
    splits = re.sub(r"[.()\[\],:;!*#{}]", " ", response).split()
    found = [c for c in choices if c in splits]
    if len(found) == 1 and splits.index(found[0]) > len(splits) - 5:
        return found[0]
    if not found and "Z" in splits:
        return "Z"
    if (m := ANSWER_IS.search(response)) and m.group(1).upper() in choices:
        return m.group(1).upper()
    texts = {k: str(v).lower() for k, v in choices.items()}
    hits = [k for k, v in texts.items() if v in response.lower()]
    return hits[0] if len(hits) == 1 and len(response) <= 2 * sum(map(len, texts.values())) else False

def mmbench_rowwise_oq(rows: list[dict]) -> float:
    """OQ MMBenchScorer: substring test per row, mean over every row (circular copies included)."""
    return sum(mc_correct_oq_substring(response=r["prediction"], gt=r["answer"]) for r in rows) / len(rows)

def mmbench_circular(rows: list[dict]) -> dict:
    """VLMEvalKit mcq_circular_eval: q scores 1 iff the extracted letter is right in each rotation (index % 1e6)."""
    hit = {}
    for r in rows:
        choices = {c: r[c] for c in string.ascii_uppercase if r.get(c) is not None}
        q, ok = str(int(r["index"]) % 1_000_000), mc_choice_extract(response=r["prediction"], choices=choices)
        hit[q] = int(hit.get(q, 1) and ok == r["answer"])
    return {"per_question_hit": hit, "accuracy": sum(hit.values()) / len(hit) if hit else 0.0}

def ai2d_correct_oq(mc_probabilities, ground_truth_answer) -> bool:
    """OQ AI2DScorer: argmax of the A-D probabilities (ties to the lower index) equals the answer's index."""
    return (p := list(mc_probabilities)).index(max(p)) == int(ground_truth_answer)

# MMMU (eval-rules §7): the OQ/lmms-eval parser and MMMU's official one differ in how a bare letter is found.
def _mmmu_parse(response, all_choices, index2ans, official: bool, seed):
    for ch in [",", ".", "!", "?", ";", ":", "'"]:
        response = response.strip(ch)
    response = " " + response + " "
    cands = [c for c in all_choices if f"({c})" in response]
    how = "brackets" if cands else "letter"
    if not cands:
        cands = [c for c in all_choices if (f" {c} " if official else f"{c} ") in response]
    if not cands and not official:
        cands = [c for c in all_choices if f"{c}." in response]
    if not cands and len(response.split()) > 5:
        cands, how = [c for c in all_choices if index2ans[c].lower() in response.lower()], "text"
    if not cands:  # the reference draws from an unseeded (OQ) or import-seeded (MMMU) global RNG; ours is per call
        return random.Random(seed).choice(all_choices)
    pos = [response.rfind(f"({c})") if how == "brackets" else response.rfind(f" {c} ") if how == "letter"
           else response.lower().rfind(index2ans[c].lower()) for c in cands]
    return cands[pos.index(max(pos))]

def mmmu_parse_multi_choice(response: str, all_choices: list, index2ans: dict, seed=42) -> str:
    """OQ MMMUScorer.parse_multi_choice_response (= lmms-eval): "(X)", then "X ", then "X.", then option text."""
    return _mmmu_parse(response, all_choices, index2ans, False, seed)

def mmmu_parse_multi_choice_official(response: str, all_choices: list, index2ans: dict, seed=42) -> str:
    """MMMU eval/eval_utils.py parse_multi_choice_response: "(X)", then " X ", then option text."""
    return _mmmu_parse(response, all_choices, index2ans, True, seed)

def _normalize_str(s: str) -> list:
    s = s.strip()
    try:
        return [round(float(s.replace(",", "")), 2)]
    except ValueError:
        s = s.lower()
    return [" " + s, s + " "] if len(s) == 1 else [s]

NUM_PATTERNS = (r"-?\b\d{1,3}(?:,\d{3})+\b", r"-?\d+(?:\.\d+)?[eE][+-]?\d+",
                r"-?(?:\d+\.\d+|\.\d+|\d+)(?![eE][+-]?\d+)(?![,\d])")  # commas, scientific, simple
KEY_INDICATORS = ["could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result "]

def mmmu_parse_open(response: str) -> list:
    """MMMU / OQ parse_open_response: key-phrase tails, every number, normalised. Compare as a set."""
    response = response.strip().strip(".").lower()
    parts, keys = re.split(r"\.\s(?=[A-Z])|\n", response), []
    for i, part in enumerate(parts):
        shortest = None
        for ind in KEY_INDICATORS + (["="] if i == len(parts) - 1 else []):
            if ind in part:
                tail = part.split(ind)[-1].strip()
                shortest = tail if not shortest or len(tail) < len(shortest) else shortest
        if shortest and shortest.strip() not in [":", ",", ".", "!", "?", ";", ":", "'"]:
            keys.append(shortest)
    keys = keys or [response]
    preds = keys + [n for k in keys for p in NUM_PATTERNS for n in re.findall(p, k)]
    return list({x for p in preds for x in _normalize_str(p)})

def mmmu_open(gold, response: str) -> bool:
    """eval_open: a string pred is right if a string gold is a substring of it; a number if it is a gold number."""
    golds = [x for g in gold for x in _normalize_str(g)] if isinstance(gold, list) else _normalize_str(gold)
    return any(any(isinstance(g, str) and g in p for g in golds) if isinstance(p, str) else p in golds
               for p in mmmu_parse_open(response))

def mmmu_eval_multi_choice(gold, pred) -> bool:
    return pred in gold if isinstance(gold, list) else gold == pred

# MathVista (eval-rules §9). OQ scores every item with MMMU's eval_open (a bug); the official pipeline extracts,
# normalises and compares strings. The LLM extraction step is not implemented: where it would run, the response
# itself goes on to normalisation (said in every report).
def mathvista_correct_oq(model_output: str, ground_truth_answer, answer_type: str) -> bool:
    """OQ's runner stores answer_type where the scorer reads question_type, so "multi_choice" never occurs."""
    return mmmu_open(gold=str(ground_truth_answer), response=model_output)

def mathvista_extract_rule(response: str, problem: dict) -> str:
    if response == "":
        return ""
    if problem["question_type"] == "multi_choice" and response in problem["choices"]:
        return response
    try:
        if problem["answer_type"] in ("integer", "float"):
            return str(int(response) if problem["answer_type"] == "integer" else float(response))
    except ValueError:
        pass
    m = re.search(r'The answer is "(.*)"\.', response)  # --quick_extract
    return m.group(1) if m else response  # the reference asks an LLM here

def _levenshtein(a: str, b: str) -> int:
    row = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        prev, row[0] = row[0], i
        for j, cb in enumerate(b, 1):
            prev, row[j] = row[j], min(row[j] + 1, row[j - 1] + 1, prev + (ca != cb))
    return row[-1]

def mathvista_normalize(extraction, choices, question_type, answer_type, precision):
    """MathVista calculate_score.py normalize_extracted_answer; None = not parseable."""
    if question_type == "multi_choice":
        extraction = str(extraction).strip()
        letter = re.findall(r"\(([a-zA-Z])\)", extraction)
        extraction = letter[0].upper() if letter else extraction
        if extraction in (options := [chr(ord("A") + i) for i in range(len(choices))]):
            return choices[options.index(extraction)]
        return min(choices, key=lambda c: _levenshtein(extraction, c))  # the first of the nearest, as list.index
    convert = {"integer": lambda x: str(int(float(x))), "float": lambda x: str(round(float(x), int(precision))),
               "list": str}.get(answer_type, lambda x: x)
    try:
        return convert(extraction)
    except (ValueError, TypeError):
        return None

def mathvista_correct_official(response: str, problem: dict, answer, precision) -> bool:
    ext = mathvista_extract_rule(response=response, problem=problem)
    return mathvista_normalize(extraction=ext, choices=problem.get("choices") or [], question_type=problem[
        "question_type"], answer_type=problem["answer_type"], precision=precision) == answer  # safe_equal

# POPE (eval-rules §10)
def pope_parse_oq(response: str):
    label = response.strip(",").strip(".").lower()
    return label if label in ("yes", "no") else None

def pope_parse_official(response: str) -> str:
    """POPE evaluate.py (= LLaVA eval_pope.py): first sentence; "no" iff a token is No/no/not, else "yes"."""
    words = response.split(".")[0].replace(",", "").split(" ")
    return "no" if any(w in ("No", "no", "not") for w in words) else "yes"

def pope_parse_vlmevalkit(response: str) -> str:
    words = _punctuation(response.lower(), PERIOD_VK, r"(\d)(,)(\d)").split()
    return "Yes" if "yes" in words and "no" not in words else "No" if "no" in words and "yes" not in words \
        else "Unknown"

def _confusion(pred_yes: list[bool], gt_yes: list[bool]) -> dict:
    c = Counter(zip(pred_yes, gt_yes))
    tp, fp, tn, fn = c[True, True], c[True, False], c[False, False], c[False, True]
    prec, rec = tp / (tp + fp) if tp + fp else 0.0, tp / (tp + fn) if tp + fn else 0.0
    return {"accuracy": (tp + tn) / max(1, len(gt_yes)), "precision": prec, "recall": rec,
            "f1": 2 * prec * rec / (prec + rec) if prec + rec else 0.0, "TP": tp, "FP": fp, "TN": tn, "FN": fn}

def pope_metrics(predictions: list[str], labels: list[str]) -> dict:
    """POPE evaluate.py on raw outputs. The reference raises on a zero precision/recall denominator; we give 0."""
    pred = [pope_parse_official(response=p) == "yes" for p in predictions]
    m = _confusion(pred, [str(g).lower() == "yes" for g in labels])
    return {**m, "yes_ratio": sum(pred) / max(1, len(pred))}

def pope_metrics_vlmevalkit(predictions: list[str], labels: list[str]) -> dict:
    """VLMEvalKit POPE_rating "Overall" row (in %); Unknown counts as not-yes and wrong."""
    ext = [pope_parse_vlmevalkit(response=p) for p in predictions]
    m = _confusion([e == "Yes" for e in ext], [g == "Yes" for g in labels])
    acc = sum(e == g for e, g in zip(ext, labels)) / max(1, len(ext))
    return {"f1": 100 * m["f1"], "accuracy": 100 * acc, "precision": 100 * m["precision"], "recall": 100 * m["recall"]}

def pope_metrics_oq(splits: dict) -> dict:
    """OQ PopeScorer: exact yes/no after the strip; accuracy and F1 (yes = 1) per split; final = their plain mean."""
    out = {}
    for name, s in splits.items():
        parsed = [pope_parse_oq(response=o) for o in s["model_outputs"]]
        gts = [str(g).lower() for g in s["labels"]]
        out[f"POPE-{name}-Accuracy"] = sum(p == g for p, g in zip(parsed, gts)) / max(1, len(gts))
        out[f"POPE-{name}-F1"] = _confusion([p == "yes" for p in parsed], [g == "yes" for g in gts])["f1"]
    return out | {f"POPE-final-{k}": sum(out[f"POPE-{n}-{k}"] for n in splits) / max(1, len(splits))
                  for k in ("Accuracy", "F1")}

RULES = {f.__name__: f for f in (
    vqa_harness_postprocess, vqa_normalize, vqa_accuracy, textvqa_oq_score, vqa_accuracy_vlmevalkit,
    mc_correct_oq_substring, mc_correct_oq_substring_cs, mmbench_rowwise_oq, mc_choice_extract, mmbench_circular,
    mmmu_parse_multi_choice, mmmu_parse_multi_choice_official, mmmu_parse_open, mmmu_open, mmmu_eval_multi_choice,
    ai2d_correct_oq, mathvista_correct_oq, mathvista_extract_rule, mathvista_normalize, mathvista_correct_official,
    pope_parse_oq, pope_metrics_oq, pope_parse_official, pope_metrics, pope_parse_vlmevalkit, pope_metrics_vlmevalkit)}

# VLMEvalKit's TSV files (formats.md §1.1), read as pandas reads them, with the standard library only.
BENCHES = {"mmmu": "MMMU_DEV_VAL.tsv", "mmbench": "MMBench_DEV_EN.tsv", "seedbench": "SEEDBench_IMG.tsv",
           "mmstar": "MMStar.tsv", "ai2d": "AI2D_TEST.tsv", "textvqa": "TextVQA_VAL.tsv",
           "mathvista": "MathVista_MINI.tsv", "pope": "POPE.tsv", "realworldqa": "RealWorldQA.tsv",
           "muirbench": "MUIRBench.tsv"}
MCQ = ("mmbench", "seedbench", "mmstar", "ai2d", "realworldqa", "muirbench", "mmmu")
NA = {"", "#N/A", "#N/A N/A", "#NA", "-1.#IND", "-1.#QNAN", "-NaN", "-nan", "1.#IND", "1.#QNAN", "<NA>", "N/A", "NA",
      "NULL", "NaN", "None", "n/a", "nan", "null"}  # pandas' default NA strings: an option "None" is no option

def read_tsv(path: str) -> list[dict]:
    """Rows as dicts of str (None for pandas' NA strings). A row whose cell count is off gets `_error`."""
    csv.field_size_limit(2**31 - 1)  # base64 images are far over csv's 128 KiB default
    rows = []
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f, delimiter="\t")
        header = next(reader)
        for cells in reader:
            r = {k: (None if v in NA else v) for k, v in zip(header, cells)}
            if len(cells) != len(header):
                r["_error"] = f"line {reader.line_num}: {len(cells)} cells, the header has {len(header)}"
            rows.append(r)
    return rows

def _literal(cell: str, what: str):
    try:
        return ast.literal_eval(cell)  # literals only: a cell can never run code
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise ValueError(f"unparsable {what} cell {cell[:40]!r}") from None

def row_images(row: dict, image_of: dict) -> list[str]:
    """One base64 image, a list literal of them, or (<= 64 chars) the index of the row whose image is reused."""
    cell = row.get("image")
    if cell is None:
        raise ValueError("no image")
    if len(cell) <= 64:
        target = image_of.get(cell)
        if target is None or len(target) <= 64:
            raise ValueError(f"image back-reference {cell!r} names no row with an image")
        cell = target
    imgs = _literal(cell, "image") if cell[0] == "[" and cell[-1] == "]" else [cell]
    if not isinstance(imgs, list) or not imgs or not all(isinstance(s, str) and len(s) > 64 for s in imgs):
        raise ValueError("image cell is not a list of base64 images")
    return imgs

def _answers(cell: str) -> list[str]:
    got = _literal(cell, "answer") if cell.startswith("[") else [cell]
    if not isinstance(got, list) or not got:
        raise ValueError("answer is not a list of strings")
    return list(map(str, got))

def load_bench(name: str, path: str) -> list[dict]:
    """One item per row: id, images (base64), category, error (None or why it cannot be asked), and its fields."""
    rows = read_tsv(path)
    if name == "mmmu":
        rows = [r for r in rows if r.get("split") in (None, "validation")]  # MMMU_DEV_VAL: report validation
    image_of, items = {r.get("index"): r.get("image") for r in rows}, []
    for k, r in enumerate(rows):
        it = {"id": r.get("index") or f"row{k}", "category": r.get("category"), "error": r.get("_error"),
              "images": [], "question": r.get("question") or ""}
        try:
            if it["error"]:
                raise ValueError(it["error"])
            it["images"] = row_images(r, image_of)
            if r.get("answer") is None or name == "pope" and r["answer"] not in ("Yes", "No"):
                raise ValueError(f"answer {r.get('answer')!r}")
            it.update(answer=r["answer"], hint=r.get("hint"),
                      options={c: r[c] for c in string.ascii_uppercase if r.get(c) is not None})
            if name == "mmmu":
                it["open"] = "A" not in it["options"]
                it["subfield"] = r.get("l2-category") or r.get("category") or ""
                it["gold"] = _answers(r["answer"]) if it["open"] and r["answer"].startswith("[") else r["answer"]
            elif name in MCQ and it["answer"] not in it["options"]:
                raise ValueError(f"answer {it['answer']!r} is not an option")
            if name == "textvqa":
                it["answers"] = _answers(r["answer"])
            if name == "pope":
                it["splits"] = (r.get("category") or "pope").split(",")
            if name == "mathvista":
                choices = _literal(r["choices"], "choices") if r.get("choices") else None
                dec = r["answer"].split(".")[1] if "." in r["answer"] else ""  # no precision column: GT's decimals
                it.update(problem={"question_type": r.get("question_type") or "free_form", "choices": choices,
                                   "answer_type": r.get("answer_type") or "text"}, answer_option=r.get("answer_option"),
                          precision=float(r.get("precision") or len(dec)))
        except ValueError as e:
            it["error"] = f"{os.path.basename(path)} index {it['id']}: {e}"
        items.append(it)
    return items

# Prompts: text with "<image>" where each image goes, and which of the row's images goes there.
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly.\nAnswer:"
VQA_SUFFIX = "\nAnswer the question using a single word or phrase.\nAnswer:"
IMAGE_TAG = re.compile(r"<image (\d)>")

def _place(text: str, n: int) -> tuple[str, list[int]]:
    """Images at their "<image>" placeholders (in order), or all first when the text has none."""
    if (k := text.count("<image>")) and k != n:
        raise ValueError(f"{k} <image> placeholders for {n} images")
    return ("" if k else "<image>\n" * n) + text, list(range(n))

def _mmmu_tags(text: str, n: int, cycle: bool) -> tuple[str, list[int]]:
    """MMMU's <image k> tags. paper: each tag -> "<image>\\n", images attached in order and cycled (OQ); standard:
    image k at its tag (VLMEvalKit split_MMMU), all first when there is no tag."""
    tags = [int(d) for d in IMAGE_TAG.findall(text)]
    if not tags:
        return _place(text, n)
    if not cycle and max(tags) > n:
        raise ValueError(f"tag <image {max(tags)}> but {n} images")
    text = IMAGE_TAG.sub("<image>\n" if cycle else "<image>", text)
    return text, [j % n for j in range(len(tags))] if cycle else [t - 1 for t in tags]

def paper_prompt(bench: str, it: dict) -> tuple[str, list[int]]:
    """The OQ harness prompts (reference.md §5), raw strings fed after <s>."""
    q, n = it["question"], len(it["images"])
    letters = "ABCD" + "".join(c for c in string.ascii_uppercase[4:] if c in it.get("options", {}))  # A-D, as OQ
    opts = "".join(f"\n{c}. {it['options'].get(c)}" for c in letters) if bench in MCQ else ""
    if bench in ("mmbench", "seedbench", "ai2d", "realworldqa"):
        return "<image>\n" + q + opts + MC_SUFFIX, [0]
    if bench == "muirbench":
        return _place(q + opts + MC_SUFFIX, n)
    if bench == "mmstar":
        return f"<image>\nQuestion: {q}" + MC_SUFFIX, [0]
    if bench == "mmmu":
        subject = "".join(" " + w for w in it["subfield"].split("_"))  # MMLU's format_subject: the double space
        head = f"The following are multiple choice questions about {subject}.\n\n"
        body = q + (VQA_SUFFIX if it["open"] else "".join(f"\n{c}. {v}" for c, v in it["options"].items()) + MC_SUFFIX)
        return _mmmu_tags(head + body, n, cycle=True)
    if bench in ("textvqa", "pope"):
        return f"<image>\nQuestion: {q}" + VQA_SUFFIX, [0]
    if bench == "mathvista":
        p = it["problem"]
        tail = "".join(f"\n{chr(65 + i)}. {c}" for i, c in enumerate(p["choices"])) + MC_SUFFIX \
            if p["question_type"] == "multi_choice" else VQA_SUFFIX
        m = re.search(r"Question: (.*?)(?:\nChoices:|$)", q, re.S)  # OQ reads `question`, the TSV has the query
        return "<image>\n" + (m.group(1).strip() if m else q) + tail, [0]
    raise ValueError(bench)

def standard_prompt(bench: str, it: dict) -> tuple[str, list[int]]:
    """VLMEvalKit's dataset-side default prompts (formats.md §1.3), images first unless placed by tags."""
    q, n = it["question"], len(it["images"])
    if bench == "muirbench":
        opts = "\n".join(f"{c}. {v}" for c, v in it["options"].items())
        return _place(f"{q}\n{opts}\nAnswer with the option's letter from the given choices directly.", n)
    if bench in MCQ:
        text = (f"Hint: {it['hint']}\n" if it.get("hint") else "") + f"Question: {q}\n"
        if it["options"]:
            text += "Options:\n" + "".join(f"{c}. {v}\n" for c, v in it["options"].items())
            text += "Please select the correct answer from the options above. \n"
        return _mmmu_tags(text, n, cycle=False) if bench == "mmmu" else _place(text, n)
    if bench == "textvqa":
        return _place(q + "\nAnswer the question using a single word or phrase.", n)
    return _place(q, n)  # pope, mathvista: the question (MathVista's full query) as is

PROMPTS = {"paper": paper_prompt, "standard": standard_prompt}

# Scoring: one row at a time (parsed, correct, soft score), then each benchmark's metrics.
def score_row(bench: str, style: str, it: dict, out: str, probs=None) -> tuple:
    paper, gt = style == "paper", it["answer"]
    if bench == "ai2d" and paper:  # the output is already the most likely letter
        return out, ai2d_correct_oq(mc_probabilities=probs, ground_truth_answer="ABCD".index(gt)), None
    if bench == "mmmu":
        if it["open"]:
            return sorted(map(str, mmmu_parse_open(response=out))), mmmu_open(gold=it["gold"], response=out), None
        parse = mmmu_parse_multi_choice if paper else mmmu_parse_multi_choice_official
        p = parse(response=out, all_choices=list(it["options"]), index2ans=it["options"], seed=f"42:{it['id']}")
        return p, mmmu_eval_multi_choice(gold=gt, pred=p), None
    if bench == "textvqa":
        s = textvqa_oq_score(generation=out, gt_answers=it["answers"]) if paper else \
            vqa_accuracy(prediction=out, gt_answers=it["answers"])
        return (vqa_harness_postprocess(out) if paper else vqa_normalize(out)), s == 1.0, s
    if bench == "pope":
        p = pope_parse_oq(response=out) if paper else pope_parse_official(response=out)
        return p, p == gt.lower(), None
    if bench == "mathvista":
        p = it["problem"]
        if paper:
            g = it["answer_option"] if p["question_type"] == "multi_choice" and it.get("answer_option") else gt
            return out, mathvista_correct_oq(model_output=out, ground_truth_answer=g, answer_type=p["answer_type"]), \
                None
        return mathvista_extract_rule(response=out, problem=p), mathvista_correct_official(
            response=out, problem=p, answer=gt, precision=it["precision"]), None
    if paper:
        rule = mc_correct_oq_substring_cs if bench == "mmstar" else mc_correct_oq_substring
        return out, rule(response=out, gt=gt), None
    p = mc_choice_extract(response=out, choices=it["options"])
    return p, p == gt, None

def bench_metrics(bench: str, style: str, samples: list[dict], items: dict) -> list[tuple]:
    """[(metric, score, primary, n)]. Error rows are in every denominator and never right."""
    n = len(samples)
    acc = sum(s["correct"] for s in samples) / max(1, n)
    if bench == "textvqa":
        return [("vqa_accuracy", sum(s.get("score") or 0.0 for s in samples) / max(1, n), True, n)]
    if bench == "mmbench" and style == "standard":
        rows = [{"index": s["id"], "prediction": s["output"], "answer": items[s["id"]].get("answer"),
                 **items[s["id"]].get("options", {})} for s in samples]
        c = mmbench_circular(rows=rows)
        return [("accuracy", c["accuracy"], True, len(c["per_question_hit"])), ("accuracy_rowwise", acc, False, n)]
    if bench == "pope":  # an error row answers the opposite of its label, so it is wrong under every rule
        by = defaultdict(lambda: {"model_outputs": [], "labels": []})
        for s in samples:
            it = items[s["id"]]
            gt = (it.get("answer") or "no").lower()
            for sp in it.get("splits", ["pope"]):
                by[sp]["model_outputs"].append({"yes": "no", "no": "yes"}[gt] if s["error"] else s["output"])
                by[sp]["labels"].append(gt)
        if style == "paper":
            m = pope_metrics_oq(splits=dict(sorted(by.items())))
            return [("accuracy", m["POPE-final-Accuracy"], True, n), ("f1", m["POPE-final-F1"], False, n)] + \
                [(k, v, False, n) for k, v in m.items() if "final" not in k]
        per = {sp: pope_metrics(predictions=d["model_outputs"], labels=d["labels"]) for sp, d in sorted(by.items())}
        return [(k, sum(p[k] for p in per.values()) / len(per), k == "f1", n) for k in ("f1", "accuracy", "precision",
                "recall", "yes_ratio")] + [(f"f1_{sp}", p["f1"], False, n) for sp, p in per.items()]
    return [("accuracy", acc, True, n)]

# Running
@dataclass
class Config:
    """python eval.py [--model SRC] [--bench a,b] [--style paper,standard] [--data DIR] [--out DIR] [--limit N]"""
    model: str = "runs/sft/final"  # anything weights.load_vlm reads
    vision: str = ""  # for checkpoints without vision weights (released prismatic runs): dir or hub id
    llm: str = ""  # for checkpoints without LLM weights: dir or hub id
    tokenizer: str = ""  # default: the model's
    bench: str = ""  # comma-separated (BENCHES); "" = every benchmark whose file exists
    style: str = "paper,standard"  # comma-separated: paper (the paper's harness) | standard (the benchmarks')
    data: str = ""  # dir of VLMEvalKit TSVs; "" = the toy world's eval/
    out: str = "runs/eval"  # results.md, results.json and STYLE/BENCH/samples.jsonl (rerun: resumes)
    chat: bool = False  # the chat template in both styles (default: standard only)
    raw: bool = False  # raw prompts after <s> in both styles
    batch_size: int = 64  # prompts per generation batch
    limit: int = 0  # first N rows of each benchmark
    max_new_tokens: int = 0  # 0 = the style's
    workers: int = 2  # image-decoding dataloader workers
    max_tiles: int = 0  # NVLM's tiles per image (model.tile_image); 0 = the model's (sft.py --max-tiles), 1 = a squash
    json: bool = False  # compare: print one JSON object

MAX_NEW_TOKENS = {"paper": 16, "standard": 128}

def load_model(cfg, device):
    """weights.load_vlm, plus the chat style and system prompt the checkpoint was tuned with (sft.py records them)."""
    src = M.need(cfg.model, "run python sft.py first, or pass --model", "config.json", hub=True)
    net = weights.load_vlm(src, vision=cfg.vision or None, llm=cfg.llm or None,
                           dtype=torch.bfloat16 if device.type == "cuda" else torch.float32).to(device).eval()
    tok_path = cfg.tokenizer or net.tokenizer_path
    if not tok_path:
        raise SystemExit(f"{cfg.model}: no tokenizer.json found; pass --tokenizer")
    saved = weights.read_config(cfg.model) if os.path.isfile(os.path.join(cfg.model, "config.json")) else {}
    net.config.max_tiles = cfg.max_tiles or net.config.max_tiles  # what the model runs with: as tuned, or --max-tiles
    return net, M.Tokenizer(tok_path), net.chat_style, saved.get("system", saved.get("system_prompt"))  # as tuned

def encode_prompt(tok, text: str, chat: bool, chat_style: str, system) -> list[int]:
    turn = [{"from": "human", "value": text}]
    return M.chat_tokens(tok, turn, style=chat_style, system=system, generation_prompt=True)[0] if chat else \
        [tok.bos_id] + tok.encode_with_images(text)

def tiled(tok, ids: list[int], images: list, c: M.VLMConfig) -> tuple[list[int], list]:
    """A prompt and its images (PIL) -> the prompt with NVLM's tile tags (if tiling) and every tile resized (uint8)."""
    tiles = [M.tile_image(im, c.vision.image_size, c.max_tiles) for im in images]
    ids = M.expand_tiles(tok, ids, [len(t) for t in tiles])[0] if c.max_tiles > 1 else ids  # 1: no tiles, no tags
    return ids, [M.image_to_uint8(t, c.vision.image_size) for ts in tiles for t in ts]

def decode_batch(job, tok, c: M.VLMConfig):
    """In a dataloader worker: (k, batch) -> (k, per item its ids and images' tiles decoded and resized, or why not)."""
    k, out = job[0], []
    for it in job[1]:
        try:
            out.append(tiled(tok, it["ids"], [M.load_image(base64.b64decode(it["images"][j], validate=True))
                                              for j in it["order"]], c))
        except Exception as e:  # noqa: BLE001 (any undecodable image is an error row, never a crash)
            out.append(re.sub(r" at 0x[0-9a-f]+", "", f"image: {type(e).__name__}: {e}")[:300])  # reproducible
    return k, out

def read_jsonl(path: str) -> list[dict]:
    """Rows of a samples file; a line cut by a kill (the last) is dropped."""
    rows = []
    with open(path) if os.path.exists(path) else io.StringIO() as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except ValueError:
                break
    return rows

def merge_samples(d: str, items: list[dict]) -> list[dict]:
    """samples.jsonl and the ranks' part files -> samples.jsonl in benchmark order; the part files go."""
    parts, got = sorted(f for f in os.listdir(d) if f.startswith("samples.rank")), {}
    for f in ["samples.jsonl"] + parts:
        for r in read_jsonl(os.path.join(d, f)):
            got.setdefault(r["id"], r)
    order = {it["id"]: k for k, it in enumerate(items)}
    rows = sorted(got.values(), key=lambda r: order.get(r["id"], len(order)))
    M.write_json(os.path.join(d, "samples.jsonl"), "".join(json.dumps(r) + "\n" for r in rows))
    for f in parts:
        os.remove(os.path.join(d, f))
    return rows

def run_bench(net, tok, bench, style, items, cfg, rank, world, device, chat_style, system) -> list[dict]:
    """Generate and score every item not yet in OUT/style/bench/samples.jsonl; rank 0 returns all the rows."""
    d = os.path.join(cfg.out, style, bench)
    if rank == 0:
        os.makedirs(d, exist_ok=True)
        merge_samples(d, items)  # also drops the line a killed run left half-written
    dist.barrier()
    done = {r["id"] for r in read_jsonl(os.path.join(d, "samples.jsonl"))}
    chat, todo, errors = (style == "standard" or cfg.chat) and not cfg.raw, [], []
    for it in items:
        it["row"] = r = {"benchmark": bench, "style": style, "id": it["id"], "prompt": None, "output": "",
                         "parsed": None, "correct": False, "category": it["category"], "error": it["error"]}
        try:
            if not r["error"]:
                r["prompt"], it["order"] = PROMPTS[style](bench, it)
                it["ids"] = encode_prompt(tok, r["prompt"], chat, chat_style, system)
                todo.append(it)
        except ValueError as e:
            if "style=" in str(e):  # the model's chat style cannot hold this row: a mismatch, not a bad row
                raise SystemExit(f"{bench} ({style}): {e} (chat style {chat_style!r}); use --raw") from None
            r["error"] = f"{BENCHES[bench]} index {it['id']}: {e}"
        if r["error"] and rank == 0 and it["id"] not in done:
            errors.append(r)
    # Length buckets over all items, done or not, so that a batch holds the same rows in every run at every world
    # size (the same shapes, the same numbers); each rank takes whole batches.
    todo.sort(key=lambda it: len(it["ids"]) + (net.config.image_tokens - 1) * it["ids"].count(M.IMAGE_ID))
    batches = [todo[i:i + cfg.batch_size] for i in range(0, len(todo), cfg.batch_size)]
    mine = [b for b in batches[rank::world] if any(it["id"] not in done for it in b)]
    part = os.path.join(d, "samples.jsonl" if world == 1 else f"samples.rank{rank}.jsonl")
    with open(part, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in errors)
    stops = [tok.encode(c)[0] for c in ".,\n"] if style == "paper" else [tok.eos_id]
    letters, likelihood = [tok.encode(c)[0] for c in "ABCD"], bench == "ai2d" and style == "paper"
    new_tokens = 1 if likelihood else cfg.max_new_tokens or MAX_NEW_TOKENS[style]
    loader = torch.utils.data.DataLoader(list(enumerate(mine)), batch_size=None, num_workers=cfg.workers,
                                         collate_fn=functools.partial(decode_batch, tok=tok, c=net.config))
    t0, shown, n_done, total, firsts = time.time(), 0.0, 0, sum(map(len, mine)), []

    def first_probs(_tokens, logits):  # AI2D (paper): the letters' renormalised probabilities at the first position
        p = logits.float().softmax(-1)[:, letters]
        firsts.extend((p / p.sum(-1, keepdim=True)).tolist())
    for k, pixels in loader:
        batch, firsts[:] = list(zip(mine[k], pixels)), []
        ok = [(it, *px) for it, px in batch if not isinstance(px, str)]  # (item, tiled ids, pixels)
        if ok:
            pv = M.normalize_pixels(torch.stack([p for *_, q in ok for p in q]).to(device), net.vision.pos_embed.dtype)
            outs = net.generate([ids for _, ids, _ in ok], pv, new_tokens, stop_ids=stops, keep_stop=True,
                                callback=first_probs if likelihood else None)
            got = dict(zip([it["id"] for it, *_ in ok], zip(outs, firsts if likelihood else [None] * len(ok))))
        rows = []
        for it, px in batch:
            r = dict(it["row"])
            if isinstance(px, str):
                r["error"] = f"{BENCHES[bench]} index {it['id']}: {px}"
            else:
                ids, probs = got[it["id"]]
                r["output"] = "ABCD"[probs.index(max(probs))] if likelihood else tok.decode(ids).strip()
                r["parsed"], r["correct"], score = score_row(bench, style, it, r["output"], probs)
                r.update({"score": score} if score is not None else {}, **({"probs": probs} if probs else {}))
            rows += [r] if it["id"] not in done else []
        with open(part, "a") as f:  # appended as they finish: a killed run resumes from here
            f.writelines(json.dumps(r) + "\n" for r in rows)
        n_done += len(batch)
        if (now := time.time()) - shown > 10 or n_done == total:  # a line every 10 s, and the last
            shown, rate = now, n_done / max(1e-9, now - t0)
            print0(f"  {style}/{bench}: {n_done}/{total} rows (rank 0) | {rate:.2f} rows/s | ETA "
                   f"{(total - n_done) / rate:.0f}s", file=sys.stderr)
    dist.barrier()
    return merge_samples(d, items) if rank == 0 else []

def write_results(out: str, results: list[dict], skipped: list[str]) -> str:
    M.write_json(os.path.join(out, "results.json"), results)
    lines = ["| benchmark | style | metric | score | n | errors |", "|---|---|---|---|---|---|"] + [
        f"| {r['benchmark']} | {r['style']} | {r['metric']}{' *' if r['primary'] else ''} | {100 * r['score']:.1f} | "
        f"{r['n']} | {r['n_error']} |" for r in results]
    lines += ["", "`*` the benchmark's primary metric. paper = the Open-Qwen2VL harness's prompts, decoding and "
              "rules; standard = the benchmarks' own (circular MMBench, VLMEvalKit prompts). MathVista standard: "
              "rule-based extraction only, no LLM judge. TextVQA: no OCR-token variant (the TSVs have no OCR tokens)."]
    M.write_json(os.path.join(out, "results.md"), text := "\n".join(lines + [f"skipped {s}" for s in skipped]) + "\n")
    return text

def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] in (["compare"], ["chat"]):
        return (compare_main if argv[0] == "compare" else chat_main)(argv[1:])
    cfg = M.parse_config(Config, argv)
    styles, names = [s for s in cfg.style.split(",") if s], [b for b in cfg.bench.split(",") if b] or list(BENCHES)
    if bad := [x for x in styles if x not in MAX_NEW_TOKENS] + [x for x in names if x not in BENCHES]:
        raise SystemExit(f"unknown style or benchmark {bad}; styles: paper, standard; benchmarks: {', '.join(BENCHES)}")
    rank, world, device = setup()
    try:
        net, tok, chat_style, system = load_model(cfg, device)
        if not cfg.data:
            import toyworld
            cfg.data = os.path.join(toyworld.ensure() if rank == 0 else toyworld.default_root(), "eval")
        paths = {b: os.path.join(M.need(cfg.data, "--data is a dir of VLMEvalKit TSVs"), BENCHES[b]) for b in names}
        skipped = [f"{b}: {p} not found" for b, p in paths.items() if not os.path.isfile(p)]
        print0("".join(f"skipped {s}\n" for s in skipped), end="")
        paths = {b: p for b, p in paths.items() if os.path.isfile(p)}
        benches, md5 = {b: load_bench(b, p)[:cfg.limit or None] for b, p in paths.items()}, {}
        for b, p in paths.items():
            with open(p, "rb") as f:
                md5[b] = hashlib.file_digest(f, "md5").hexdigest()
        results = []
        for style in styles:
            for b, items in benches.items():
                rows = run_bench(net, tok, b, style, items, cfg, rank, world, device, chat_style, system)
                n_err = sum(r["error"] is not None for r in rows)
                results += [{"benchmark": b, "style": style, "metric": metric, "score": score, "n": n,
                             "n_error": n_err, "primary": primary, "model": cfg.model, "data": paths[b], "md5": md5[b]}
                            for metric, score, primary, n in (bench_metrics(b, style, rows, {it["id"]: it for it in
                                                                                          items}) if rank == 0 else [])]
        if rank == 0:
            print(write_results(cfg.out, results, skipped))
        return results
    finally:
        dist.destroy_process_group()

# compare: are two runs really different? McNemar on the paired right/wrong table.
def mcnemar(only_a: int, only_b: int) -> dict:
    """statsmodels mcnemar(exact=True): two-sided binomial on the discordant pairs, statistic min(b, c); and the
    chi-square version with continuity correction, (|b - c| - 1)^2 / (b + c) on 1 degree of freedom."""
    n, k = only_a + only_b, min(only_a, only_b)
    p_exact = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2**n)
    chi2 = (abs(only_a - only_b) - 1) ** 2 / n if n else 0.0
    return {"statistic": k, "p_exact": p_exact, "chi2": chi2, "p_chi2": math.erfc(math.sqrt(chi2 / 2)) if n else 1.0}

def _outcomes(rows: list[dict], bench: str, style: str) -> dict:
    """id -> right. Standard MMBench: a question is right iff all its circular copies are. TextVQA: score 1.0."""
    if bench != "mmbench" or style != "standard":
        return {r["id"]: bool(r["correct"]) for r in rows}
    g = defaultdict(lambda: True)
    for r in rows:
        g[str(int(r["id"]) % 1_000_000)] &= bool(r["correct"])
    return dict(g)

def compare(run_a: str, run_b: str, style: str = "paper,standard") -> dict:
    out = {}
    for s, b in ((s, b) for s in style.split(",") for b in sorted(BENCHES)):
        pa, pb = (os.path.join(r, s, b, "samples.jsonl") for r in (run_a, run_b))
        if os.path.isfile(pa) and os.path.isfile(pb):
            a, c = _outcomes(read_jsonl(pa), b, s), _outcomes(read_jsonl(pb), b, s)
            pairs = Counter((a[k], c[k]) for k in set(a) & set(c))
            t = {"n": sum(pairs.values()), "both": pairs[True, True], "only_a": pairs[True, False],
                 "only_b": pairs[False, True], "neither": pairs[False, False]}
            out.setdefault(s, {})[b] = {**t, **mcnemar(t["only_a"], t["only_b"])}
    return out

def compare_main(argv):
    if len(argv) < 2 or argv[0].startswith("-") or argv[1].startswith("-"):
        raise SystemExit("usage: python eval.py compare RUN_A RUN_B [--style S] [--json]")
    cfg = M.parse_config(Config, argv[2:], prog="eval.py compare RUN_A RUN_B")
    res = compare(*(M.need(r, "run python eval.py --out RUN first") for r in argv[:2]), cfg.style)
    for s, benches in res.items() if not cfg.json else []:
        for b, t in benches.items():
            note = "  (right = soft score 1.0)" if b == "textvqa" else "  (circular questions)" if (b, s) == (
                "mmbench", "standard") else ""
            print(f"{s:8} {b:11} n {t['n']:5}  both {t['both']:5}  only A {t['only_a']:4}  only B {t['only_b']:4}  "
                  f"neither {t['neither']:5}  McNemar exact p {t['p_exact']:.4g}  chi2 {t['chi2']:.3f} p "
                  f"{t['p_chi2']:.4g}{note}")
    if cfg.json:
        print(json.dumps(res))
    return res

# chat: one answer, streamed
@dataclass
class ChatConfig(Config):
    """python eval.py chat --model SRC --image a.jpg [--image b.jpg] "prompt" [--temperature T] [--top-p P]"""
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0  # nucleus sampling mass, with --temperature > 0
    seed: int = 0  # sampling seed

def chat_main(argv):
    flags = [k for k, a in enumerate(argv) if a == "--image"]  # repeatable: taken out before parse_config
    images = [argv[k + 1] for k in flags if k + 1 < len(argv)]
    rest = [a for k, a in enumerate(argv) if k not in flags and k - 1 not in flags]
    cfg = M.parse_config(ChatConfig, rest[:-1] if rest[-1:] and rest[-1][:1] != "-" else rest, prog="eval.py chat")
    if not rest or rest[-1].startswith("-"):
        raise SystemExit('usage: python eval.py chat --model SRC --image a.jpg [--image b.jpg] "prompt"')
    net, tok, chat_style, system = load_model(cfg, torch.device("cuda" if torch.cuda.is_available() else "cpu"))
    ids, px = tiled(tok, encode_prompt(tok, _place(rest[-1], len(images))[0], not cfg.raw, chat_style, system),
                    [M.load_image(p) for p in images], net.config)
    pv = M.normalize_pixels(torch.stack(px), net.vision.pos_embed.dtype).to(net.vision.pos_embed.device) if px else None
    shown, new = "", []

    def stream(t, _logits):  # print the text as it grows (a token can end inside a character)
        nonlocal shown
        new.append(int(t[0]))
        if not (s := tok.decode(new)).endswith("\ufffd"):
            print(s[len(shown):], end="", flush=True)
            shown = s
    net.generate([ids], pv, cfg.max_new_tokens or 256, stop_ids=[tok.eos_id], temperature=cfg.temperature,
                 top_p=cfg.top_p, seed=cfg.seed, callback=stream)
    print()
    return shown

if __name__ == "__main__":
    main()
