#!/usr/bin/env bash
# The pipeline's own stages at FLUX.1-dev size on one GPU, one after another, each timed from its
# command to its exit with its peak GPU memory (docs/performance.md). The stages run in ONE detached
# process (setsid), so they outlive a caller that may only wait a few minutes at a time (the device
# tool's calls): `start` copies the code and the data into WORK and launches them, `watch` waits (at
# most LIMIT seconds) and prints progress; once they have ended, both print the summary. From the
# repository root:
#   DATA_DIR=/path/with/crop+caption OUT=/tmp/out bash benchmarks/stages_gpu.sh start
#   OUT=/tmp/out bash benchmarks/stages_gpu.sh watch      # again, until it says "ended"
# DATA_DIR holds crop/ and caption/ as the crop and caption stages write them (and base/, if the
# model profile loads the base stage's pipeline). The runs in docs/performance.md used the demo
# painter's: after `dvc repro caption`, `DATA_DIR=.gpu14/data bash benchmarks/stages_gpu.sh data`
# copies 6 training and 2 held-out crops of each bucket with their captions (10 are trained:
# train.validation.num_samples holds 2 back).
#   STAGES      stages in order (default: train augment retrain evaluate generate); `generate` is
#               `artmaster generate` with the trained LoRA
#   EPOCHS      train.epochs (default 4). The recipe's 6000 steps: 10 trained crops x 10 repeats x 60
#   EVERY       train.checkpoint.every (default: the recipe's)
#   COUNT       augment.count (default 2); RETRAIN_EPOCHS retrain.recipe.epochs (default 1)
#   MODEL_ARGS  the model (default: FLUX.1-dev's architecture with random weights); EXTRA: more
#               overrides for every stage
# Written to OUT: each stage's log and metrics.json, times.tsv, smi.csv (nvidia-smi every 2 s).
set -o pipefail
WORK=${WORK:-/tmp/stages}; LIMIT=${LIMIT:-540}
BEGIN=$(date +%s)

runner() {  # the detached job: every stage in turn, one line per stage in times.tsv
  read -r -a model <<< "${MODEL_ARGS:-experiment=artmaster_flux model=flux_dev_random}"
  read -r -a extra <<< "${EXTRA:-}"
  local common=("${model[@]}" tracking.enabled=false "paths.data_dir=$WORK/data" "hydra.run.dir=$WORK/hydra" replicates.count=1
                "train.epochs=${EPOCHS:-4}" ${EVERY:+"train.checkpoint.every=$EVERY"} "${extra[@]}")
  local stage args begin
  for stage in ${STAGES:-train augment retrain evaluate generate}; do
    case $stage in
      augment) args=(augment "${common[@]}" "augment.count=${COUNT:-2}" "augment.generation.batch_size=${COUNT:-2}") ;;
      retrain) args=(retrain "${common[@]}" "retrain.recipe.epochs=${RETRAIN_EPOCHS:-1}") ;;
      evaluate) args=(evaluate "${common[@]}" "evaluate.prompts=[a misty gorge between steep mountains,a cat sitting on a chair]"
                      "evaluate.seeds=[0]" evaluate.vae_roundtrip=false evaluate.generation.batch_size=2) ;;
      generate) args=(generate "a misty gorge between steep mountains" --adapter "$WORK/data/train/lora" --count 2
                      --out "$WORK/data/generate/grid.png" "${common[@]}") ;;
      *) args=("$stage" "${common[@]}") ;;
    esac
    begin=$(date +%s.%N)
    python3 -m artmaster.cli "${args[@]}" > "$WORK/$stage.log" 2>&1
    printf '%s\t%s\t%s\t%s\n' "$stage" "$?" "$begin" "$(date +%s.%N)" >> "$WORK/times.tsv"
  done
  date +%s > "$WORK/ended"
}

start() {
  rm -rf "$WORK" && mkdir -p "$WORK/data" || exit 1
  cp -r src conf "$WORK/" && cp -r "${DATA_DIR:?set DATA_DIR}/crop" "${DATA_DIR}/caption" "$WORK/data/" || exit 1
  [ -d "$DATA_DIR/base" ] && cp -r "$DATA_DIR/base" "$WORK/data/"   # a saved base model (the tiny profile's)
  date +%s > "$WORK/started"
  if command -v nvidia-smi > /dev/null; then
    setsid nohup nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits \
      -lms 2000 > "$WORK/smi.csv" 2>/dev/null < /dev/null &
    echo $! > "$WORK/smi.pid"
  fi
  # the stages' own process: cwd WORK (its conf/ is the copy's), PYTHONPATH to the copy's src/
  export WORK STAGES EPOCHS EVERY COUNT RETRAIN_EPOCHS MODEL_ARGS EXTRA
  (cd "$WORK" && PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}" TORCH_LOGS=recompiles setsid nohup bash -c \
    "$(declare -f runner); runner" < /dev/null > "$WORK/runner.log" 2>&1 &)
  echo "started: ${STAGES:-train augment retrain evaluate generate} in $WORK"
}

progress() {  # the stage running now and its newest progress-bar line
  local stage; stage=$(ls -t "$WORK"/*.log 2>/dev/null | grep -v runner.log | head -1)
  [ -n "$stage" ] && echo "$(basename "$stage" .log): $(tr '\r' '\n' < "$stage" | grep -a "it/s\|s/it\|step" | tail -1 | cut -c1-150)"
}

summary() {  # the stages ended so far; a machine lost before the next call still returns them
  cp "$WORK"/*.log "$WORK/times.tsv" "$OUT/" 2>/dev/null
  [ -f "$WORK/smi.csv" ] && cp "$WORK/smi.csv" "$OUT/"
  for stage in train augment retrain evaluate; do
    local found; found=$(find "$WORK/data/$stage" -name metrics.json 2>/dev/null | sort | tail -1)
    [ -n "$found" ] && cp "$found" "$OUT/$stage-metrics.json"
  done
  python3 benchmarks/stages_report.py "$WORK/times.tsv" "$OUT" "$WORK/smi.csv"
}

watch() {
  [ -f "$WORK/started" ] || { echo "nothing started in $WORK"; exit 1; }
  while [ ! -f "$WORK/ended" ] && [ $(( $(date +%s) - BEGIN + 20 )) -le "$LIMIT" ]; do  # ends within LIMIT
    sleep 20
    echo "$(( $(date +%s) - $(cat "$WORK/started") )) s: $(progress)"
  done
  if [ -f "$WORK/ended" ]; then
    echo "ended"  # the sampler stops by pid: `pkill -f nvidia-smi` also killed a caller whose command named it
    [ -f "$WORK/smi.pid" ] && kill "$(cat "$WORK/smi.pid")" 2>/dev/null
  else echo "still running after $(( $(date +%s) - $(cat "$WORK/started") )) s"; fi
  [ -f "$WORK/times.tsv" ] && summary
}

data() {  # the demo crops the GPU runs use, from the crop and caption stages' outputs in data/
  python3 - "${DATA_DIR:?set DATA_DIR}" <<'EOF'
import shutil, sys
from pathlib import Path
from artmaster.dataset import HELDOUT, TRAIN, split_rows
from artmaster.files import read_jsonl, write_jsonl
source, target = Path("data"), Path(sys.argv[1])
crops = read_jsonl(source / "crop/crops.jsonl")
captions = {row["crop_id"]: row for row in read_jsonl(source / "caption/captions.jsonl")}
buckets = sorted({row["bucket"] for row in crops})


def one_per_scan_first(rows):  # the evaluate stage judges the held-out crops of at least 2 scans
    firsts = list({row["scan_id"]: row for row in reversed(rows)}.values())[::-1]
    return firsts + [row for row in rows if row not in firsts]


chosen = [row for bucket in buckets for split, count in ((TRAIN, 6), (HELDOUT, 2))
          for row in (one_per_scan_first if split == HELDOUT else list)(
              split_rows([r for r in crops if r["bucket"] == bucket], split))[:count]]
shutil.rmtree(target, ignore_errors=True)
for row in chosen:
    (target / "crop" / row["path"]).parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(source / "crop" / row["path"], target / "crop" / row["path"])
(target / "caption").mkdir(parents=True)
write_jsonl(target / "crop/crops.jsonl", chosen)
write_jsonl(target / "caption/captions.jsonl", [captions[row["crop_id"]] for row in chosen])
print(f"{len(chosen)} crops with captions in {target}")
EOF
}

case "${1:-}" in
  data) data ;;
  start) : "${OUT:?set OUT}"; start; watch ;;
  watch) : "${OUT:?set OUT}"; watch ;;
  *) echo "usage: $0 data|start|watch" >&2; exit 2 ;;
esac
