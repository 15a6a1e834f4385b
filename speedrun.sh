#!/usr/bin/env bash
# speedrun.sh: the whole recipe, one command. On the toy world (toyworld.py) it filters the pool with a SigLIP,
# packs what is kept, pre-trains, instruction-tunes and evaluates the tiny model, and ends with the results table:
#
#   bash speedrun.sh               # the default toy world: cache/toyworld -> runs/
#   bash speedrun.sh --ablation    # the claim in miniature: a noisier world, the same recipe unfiltered vs filtered
#
# Every stage is one of the repo's scripts, run as you would run it by hand, and reads the files the one before it
# wrote; every path is explicit. The recipe is in the stages' own defaults: this file holds only paths. Each stage's
# output goes to RUNS/logs/NAME.log; the terminal gets one summary line per stage. The first failing stage stops
# the run and its error is shown.
#
# Rerun: a stage whose output is complete (the file it writes last, atomically, exists) is skipped; the others run
# again: train.py and sft.py with --resume auto (from their newest checkpoint), and filter.py, pack.py and eval.py
# keep what they had finished (shards, score files, evaluated rows). A skipped stage is not redone when something
# before it changed: to redo a stage, delete its output and everything after it (or use a new RUNS).
#
# Environment, all optional:
#   WORLD=cache/toyworld RUNS=runs           the world's dir and the runs' dir (relative to this file's dir)
#   WORLD_FLAGS                              toyworld.py, e.g. "--n-pool 600 --n-sft 200 --n-eval 60"
#   FILTER_FLAGS SCORE_FLAGS SELECT_FLAGS RESHARD_FLAGS   filter.py train / score / select / reshard
#   PACK_FLAGS TRAIN_FLAGS SFT_FLAGS EVAL_FLAGS           pack.py, train.py, sft.py, eval.py
#   NOISY_WORLD=cache/toyworld-noisy ABLATION_RUNS=runs/ablation NOISY_FLAGS NOISY_SELECT_FLAGS   (--ablation)
#   VERBOSE=1                                every stage's output on the terminal too
# Flags are appended after the ones below, so they override them (the last occurrence of a flag wins); they are
# split on spaces, so paths in them cannot contain spaces.
set -euo pipefail
cd "$(dirname "$0")"

WORLD=${WORLD:-cache/toyworld}
RUNS=${RUNS:-runs}
SELECT_FLAGS=${SELECT_FLAGS:---top-fraction 0.9}  # the toy world's default: 10% of the captions are wrong
NOISY_WORLD=${NOISY_WORLD:-cache/toyworld-noisy}
ABLATION_RUNS=${ABLATION_RUNS:-runs/ablation}
NOISY_FLAGS=${NOISY_FLAGS:---wrong-share 0.3}
NOISY_SELECT_FLAGS=${NOISY_SELECT_FLAGS:---top-fraction 0.7}  # 30% wrong
for v in WORLD_FLAGS FILTER_FLAGS SCORE_FLAGS RESHARD_FLAGS PACK_FLAGS TRAIN_FLAGS SFT_FLAGS EVAL_FLAGS; do
    declare "$v=${!v:-}"  # unset = no extra flags
done
ABLATION=0
for arg in "$@"; do
    case $arg in
        --ablation) ABLATION=1 ;;
        *) echo "usage: bash speedrun.sh [--ablation]  (settings: environment variables, see speedrun.sh's top)" >&2
           exit 2 ;;
    esac
done

# -----------------------------------------------------------------------------------------------------------------
# Helpers. `complete FILE...`: every marker file exists. `stage NAME LOG PATTERN CMD...`: run CMD unless the markers
# of the last `complete` call exist; its output goes to LOG; print the last line of LOG matching PATTERN (empty: the
# end of LOG on one line); on failure print the end of LOG and stop with CMD's exit status.

DONE=0 RAN=
complete() {
    local file
    DONE=1
    for file in "$@"; do [[ -f $file ]] || DONE=0; done
}

stage() {
    local name=$1 log=$2 pattern=$3 t0=$SECONDS rc=0
    shift 3
    if (( DONE )); then
        printf '%-22s skipped: complete (%s)%s\n' "$name" "$log" \
            "${RAN:+; made before $RAN ran again: delete it to redo it}"
        return
    fi
    RAN=$name
    mkdir -p "$(dirname "$log")"
    printf '%-22s ' "$name"
    [[ ${VERBOSE:-0} == 1 ]] && echo "$*"
    if [[ ${VERBOSE:-0} == 1 ]]; then "$@" 2>&1 | tee "$log" || rc=$?; else "$@" > "$log" 2>&1 || rc=$?; fi
    if (( rc )); then
        echo "FAILED (exit $rc): $*"
        tail -n 15 "$log" | sed 's/^/    /'
        echo "(the whole output: $log)"
        exit "$rc"
    fi
    local line
    if [[ -n $pattern ]]; then
        line=$(grep -E -- "$pattern" "$log" | tail -n 1 || tail -n 1 "$log")  # none (a resume with no steps left)
    else
        line=$(tr -s '\n ' ' ' < "$log")  # a JSON summary: its end holds the totals
        (( ${#line} <= 160 )) || line="...${line: -160}"
    fi
    printf '%4ds  %s\n' $((SECONDS - t0)) "$line"
}

# each_shard POOL DIR EXT: DIR/NAME.EXT for each POOL/NAME.tar (filter.py score writes one file per input shard)
each_shard() {
    local tar
    for tar in "$1"/*.tar; do echo "$2/$(basename "$tar" .tar).$3"; done
}

# same_run DIR KEY VALUE: stop unless DIR (a train.py or sft.py run dir) is new or records --KEY VALUE in its
# config.json: a run made by hand (`python train.py` trains on the unfiltered toy pool into runs/pretrain) must not
# be taken for this one, nor resumed by --resume auto on other data
same_run() {
    if [[ -f $1/config.json ]] && ! grep -qF "\"$2\": \"$3\"" "$1/config.json"; then
        echo "speedrun: $1 holds a run with another --$2 than $3: delete it, or set RUNS to another dir" >&2
        exit 1
    fi
}

# -----------------------------------------------------------------------------------------------------------------
# The stages. world W -> filter.py (scores, keep list, filtered pool) -> pack.py -> train.py -> sft.py -> eval.py

build_world() {  # build_world W R FLAGS...
    local w=$1 r=$2
    shift 2
    # toyworld.py: the pool shards, the SFT set, the evaluation TSVs and the tokenizer; manifest.json is written last
    complete "$w/manifest.json"
    stage "toyworld.py" "$r/logs/toyworld.log" "^toyworld:" python toyworld.py --out "$w" "$@"
}

filter_pool() {  # filter_pool W R SELECT_FLAGS...: W/pool -> R/filter/pool, the samples the filter keeps
    local w=$1 r=$2 f=$2/filter
    shift 2
    # filter.py train: a small SigLIP trained on the pool itself (the toy world has no pretrained scorer);
    # save_siglip writes config.json last
    complete "$f/siglip/config.json"
    stage "filter.py train" "$r/logs/filter-train.log" "^train: step" \
        python filter.py train --input "$w/pool" --tokenizer "$w/tokenizer.json" --out "$f/siglip" $FILTER_FLAGS
    # filter.py score: SigLIP's image-text similarity of every sample, one .jsonl per pool shard (each renamed
    # into place when finished; a rerun scores only the missing ones)
    complete $(each_shard "$w/pool" "$f/scores" jsonl)
    stage "filter.py score" "$r/logs/filter-score.log" "^score: rank 0:" \
        python filter.py score --input "$w/pool" --model "$f/siglip" --out "$f/scores" $SCORE_FLAGS
    # filter.py select: the uids of the best-scoring samples as a DataComp uid array; keep.json is written last
    complete "$f/keep.npy" "$f/keep.json"
    stage "filter.py select" "$r/logs/filter-select.log" "" \
        python filter.py select --scores "$f/scores" --out "$f/keep.npy" "$@"
    # filter.py reshard: those samples copied byte for byte into new shards; stats.json is written last
    complete "$f/pool/stats.json"
    stage "filter.py reshard" "$r/logs/filter-reshard.log" "^reshard:" \
        python filter.py reshard --input "$w/pool" --uids "$f/keep.npy" --out "$f/pool" $RESHARD_FLAGS
}

train_eval() {  # train_eval W POOL R TRAIN_FLAGS...: pack POOL, pre-train, SFT and evaluate into R
    local w=$1 pool=$2 r=$3 shape
    shift 3
    # pack.py: captions tokenized and packed with their images into rows of train.py's sequence length (its
    # preset's, read from train.py itself); stats.json is written last
    complete "$r/packed/stats.json"
    if (( ! DONE )); then
        shape=$(python -c 'import sys, model, train
c = model.parse_config(train.Config, sys.argv[1:], train.PRESETS)
print("--seq-len", c.seq_len, "--image-tokens", c.image_tokens)' $TRAIN_FLAGS "$@")
    fi
    stage "pack.py" "$r/logs/pack.log" "^pack: .* samples ->" \
        python pack.py --input "$pool" --output "$r/packed" --tokenizer "$w/tokenizer.json" ${shape:-} $PACK_FLAGS
    # train.py: pre-training (frozen tower, projector + LLM on the packed rows); final/ is the plain checkpoint,
    # its tokenizer.json written last
    same_run "$r/pretrain" data "$r/packed"
    complete "$r/pretrain/final/tokenizer.json"
    stage "train.py" "$r/logs/train.log" "step [0-9]+/[0-9]+ loss" \
        python train.py --data "$r/packed" --tokenizer "$w/tokenizer.json" --out "$r/pretrain" --resume auto \
        $TRAIN_FLAGS "$@"
    # sft.py: instruction tuning of that checkpoint on the world's LLaVA-format conversations, full resolution
    same_run "$r/sft" init "$r/pretrain/final"
    complete "$r/sft/final/tokenizer.json"
    stage "sft.py" "$r/logs/sft.log" "step [0-9]+/[0-9]+ loss" \
        python sft.py --init "$r/pretrain/final" --data "$w/sft/sft.json" --out "$r/sft" --resume auto $SFT_FLAGS
    # eval.py: the world's benchmarks, both styles (paper, standard); results.md is written last
    complete "$r/eval/results.md"
    stage "eval.py" "$r/logs/eval.log" "^\| [a-z]" \
        python eval.py --model "$r/sft/final" --data "$w/eval" --out "$r/eval" $EVAL_FLAGS
}

# -----------------------------------------------------------------------------------------------------------------
# The default run: the toy world, filtered, then trained on what the filter keeps.

if (( ! ABLATION )); then
    echo "speedrun: world $WORLD, runs in $RUNS (logs in $RUNS/logs)"
    build_world "$WORLD" "$RUNS" $WORLD_FLAGS
    filter_pool "$WORLD" "$RUNS" $SELECT_FLAGS
    train_eval "$WORLD" "$RUNS/filter/pool" "$RUNS"
    echo "speedrun: done in $((SECONDS / 60))m$((SECONDS % 60))s; the results ($RUNS/eval/results.md):"
    echo
    cat "$RUNS/eval/results.md"
    exit 0
fi

# -----------------------------------------------------------------------------------------------------------------
# --ablation: a noisier world in its own dir (the default world is left alone), the same recipe trained twice, on
# the whole pool and on what the filter keeps, for the same number of steps (the unfiltered run's epoch), then
# eval.py compare: McNemar's test on the paired right/wrong answers, per benchmark.

A=$ABLATION_RUNS
echo "speedrun --ablation: world $NOISY_WORLD ($NOISY_FLAGS), runs in $A"
build_world "$NOISY_WORLD" "$A" $WORLD_FLAGS $NOISY_FLAGS
after_world=$RAN  # the filtered half depends on the world, not on the unfiltered half
echo "-- unfiltered: $A/unfiltered"
train_eval "$NOISY_WORLD" "$NOISY_WORLD/pool" "$A/unfiltered"
steps=$(tail -n 1 "$A/unfiltered/pretrain/metrics.jsonl" |
        python -c 'import json, sys; print(json.load(sys.stdin)["step"])')  # its last step
echo "-- filtered: $A/filtered (pre-training for the same $steps steps)"
RAN=$after_world
filter_pool "$NOISY_WORLD" "$A/filtered" $NOISY_SELECT_FLAGS
train_eval "$NOISY_WORLD" "$A/filtered/filter/pool" "$A/filtered" --steps "$steps"
echo
echo "results: A = unfiltered ($A/unfiltered/eval/results.md), B = filtered ($A/filtered/eval/results.md)"
python eval.py compare "$A/unfiltered/eval" "$A/filtered/eval" $EVAL_FLAGS | tee "$A/compare.txt"
