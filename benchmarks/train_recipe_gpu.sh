#!/usr/bin/env bash
# The recipe's optimizer steps run by the train stage itself on one GPU, timed from the command to
# its exit (docs/performance.md, "The recipe's 6000 steps"). The stage runs as ONE detached process
# (setsid), so it outlives a caller that may only wait a few minutes at a time (the device tool's
# calls): `start` copies the code and the data into WORK and launches it, `watch` waits for it (or
# for LIMIT seconds) and prints progress; when it has ended, both print the summary. Run from the
# repository root:
#   DATA_DIR=/path/with/crop+caption OUT=/tmp/out bash benchmarks/train_recipe_gpu.sh start
#   OUT=/tmp/out bash benchmarks/train_recipe_gpu.sh watch      # again, until it says "ended"
# DATA_DIR holds crop/ and caption/ as the crop and caption stages write them (and base/, if the
# model profile loads the base stage's pipeline). The recipe's 6000
# steps need crops x repeats (10) x EPOCHS = 6000: 10 trained crops (2 more held out) and EPOCHS=60.
# MODEL_ARGS picks the model (default: FLUX.1-dev's architecture with random weights); EXTRA adds
# overrides. Also written: nvidia-smi's memory and utilisation every 5 s (smi.csv).
set -o pipefail
WORK=${WORK:-/tmp/recipe}; OUT=${OUT:?set OUT}; LIMIT=${LIMIT:-540}
BEGIN=$(date +%s)

start() {
  rm -rf "$WORK" && mkdir -p "$WORK/data" || exit 1
  cp -r src conf "$WORK/" && cp -r "${DATA_DIR:?set DATA_DIR}/crop" "${DATA_DIR}/caption" "$WORK/data/" || exit 1
  [ -d "$DATA_DIR/base" ] && cp -r "$DATA_DIR/base" "$WORK/data/"   # a saved base model (the tiny profile's)
  read -r -a model <<< "${MODEL_ARGS:-experiment=artmaster_flux model=flux_dev_random}"
  read -r -a extra <<< "${EXTRA:-}"
  local args=("${model[@]}" tracking.enabled=false "paths.data_dir=$WORK/data" "train.epochs=${EPOCHS:-60}"
              "hydra.run.dir=$WORK/hydra" "${extra[@]}")
  printf '%q ' python3 -m artmaster.cli train "${args[@]}" > "$WORK/command"
  date +%s > "$WORK/started"
  if command -v nvidia-smi > /dev/null; then
    setsid nohup nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader,nounits \
      -l 5 > "$WORK/smi.csv" 2>/dev/null < /dev/null &
  fi
  # the stage's own process: cwd WORK (its conf/ is the copy's), PYTHONPATH to the copy's src/
  (cd "$WORK" && PYTHONPATH="$WORK/src${PYTHONPATH:+:$PYTHONPATH}" TORCH_LOGS=recompiles setsid nohup bash -c \
    "$(cat "$WORK/command") > '$WORK/train.log' 2>&1; echo \$? > '$WORK/rc'; date +%s > '$WORK/ended'" \
    < /dev/null > /dev/null 2>&1 &)
  echo "started: $(cat "$WORK/command")"
}

progress() {  # the newest progress-bar line and the newest logged row
  tr '\r' '\n' < "$WORK/train.log" | grep -a "train:" | grep -a "it/s\|s/it\|step" | tail -1 | cut -c1-160
}

summary() {
  local started ended; started=$(cat "$WORK/started"); ended=$(cat "$WORK/ended")
  echo "ended: rc $(cat "$WORK/rc"), the stage took $((ended - started)) s ($(( (ended - started) / 60 )) min $(( (ended - started) % 60 )) s) from the command to its exit"
  pkill -f "nvidia-smi --query-gpu" 2>/dev/null
  cp "$WORK/train.log" "$OUT/train.log" 2>/dev/null
  for name in metrics.json loss.csv val_loss.csv; do cp "$WORK/data/train/$name" "$OUT/" 2>/dev/null; done
  [ -f "$WORK/smi.csv" ] && cp "$WORK/smi.csv" "$OUT/smi.csv" \
    && awk -F', ' '{ if ($2 > m) m = $2 } END { print "nvidia-smi: most memory used " m " MiB" }' "$WORK/smi.csv"
  grep -ac "Recompiling" "$WORK/train.log" | sed 's/^/recompiles logged: /'
  tail -c 1500 "$WORK/train.log"
  [ -f "$OUT/metrics.json" ] && python3 -c "import json, sys; m = json.load(open(sys.argv[1])); \
print({k: m[k] for k in ('steps', 'steps_per_second', 'steady_steps_per_second', 'wall_seconds', \
'evaluation_seconds', 'peak_gpu_memory_gb', 'loss', 'val_loss') if k in m})" "$OUT/metrics.json"
}

watch() {
  [ -f "$WORK/started" ] || { echo "nothing started in $WORK"; exit 1; }
  while [ ! -f "$WORK/ended" ] && [ $(( $(date +%s) - BEGIN + 20 )) -le "$LIMIT" ]; do  # ends within LIMIT
    sleep 20
    echo "$(( $(date +%s) - $(cat "$WORK/started") )) s: $(progress)"
  done
  if [ -f "$WORK/ended" ]; then summary; else echo "still running after $(( $(date +%s) - $(cat "$WORK/started") )) s"; tail -c 600 "$WORK/train.log" | tr '\r' '\n' | tail -3 > "$OUT/train_tail.log"; fi
}

case "${1:-}" in
  start) start; watch ;;
  watch) watch ;;
  *) echo "usage: $0 start|watch" >&2; exit 2 ;;
esac
