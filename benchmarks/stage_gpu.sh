#!/usr/bin/env bash
# The pipeline's own train and evaluate stages at FLUX.1-dev size on one GPU (docs/performance.md,
# run B): train with the recipe (both buckets, CUDA graphs), SIGKILL once the checkpoint at step
# KILL_STEP exists, train.resume=auto to the end, then evaluate (base + adapter, 2 prompts, the
# LoRA folded into compiled blocks). MLflow off. Run from the repository root:
#   DATA_DIR=/path/with/crop+caption OUT=/tmp/out bash benchmarks/stage_gpu.sh
# DATA_DIR holds data/crop and data/caption as the crop and caption stages write them; outputs go
# there too. LIMIT (s) bounds the whole run; EPOCHS, EVERY, KILL_STEP size it.
set -o pipefail
DATA_DIR=${DATA_DIR:?set DATA_DIR}; OUT=${OUT:?set OUT}
START=$(date +%s)
left() { echo $(( ${LIMIT:-470} - ($(date +%s) - START) )); }
export TORCH_LOGS=recompiles
read -r -a MODEL <<< "${MODEL_ARGS:-experiment=artmaster_flux model=flux_dev_random}"
C=("${MODEL[@]}" tracking.enabled=false "paths.data_dir=$DATA_DIR" "train.epochs=${EPOCHS:-4}"
   "train.checkpoint.every=${EVERY:-150}" train.checkpoint.keep_after_success=true)
KILL_AT=$(printf 'step-%06d' "${KILL_STEP:-300}")
rm -rf "$DATA_DIR/train" "$DATA_DIR/evaluate"
python3 -m artmaster.cli train "${C[@]}" > "$OUT/train1.log" 2>&1 &
pid=$!
while kill -0 $pid 2>/dev/null; do
  if [ -f "$DATA_DIR/train/checkpoints/$KILL_AT/meta.json" ]; then sleep 3; kill -9 $pid; echo "SIGKILL after $KILL_AT"; break; fi
  if [ "$(left)" -lt 190 ]; then kill -9 $pid; echo "train 1 over its time: SIGKILL"; break; fi
  sleep 1
done
wait $pid; echo "train 1 rc $? at $(( $(date +%s) - START )) s"
timeout -s INT $(( $(left) > 260 ? $(left) - 100 : $(left) - 10 )) python3 -m artmaster.cli train "${C[@]}" 2>&1 \
  | tee "$OUT/train2.log" | tail -c 3000
echo "train 2 rc $? at $(( $(date +%s) - START )) s"
cp "$DATA_DIR/train/metrics.json" "$OUT/train_metrics.json"; cp "$DATA_DIR/train/loss.csv" "$OUT/loss.csv"
E=("evaluate.prompts=[a misty gorge between steep mountains,a cat sitting on a chair]" "evaluate.seeds=[0]"
   "evaluate.models=[{name:base,adapter:null,prefix:'',suffix:''},{name:adapter,adapter:'$DATA_DIR/train/lora',prefix:'zxh style, ',suffix:''}]"
   "evaluate.pairs=[]" evaluate.vae_ceiling=false evaluate.generation.batch_size=2)
if [ "$(left)" -gt 90 ]; then
  timeout -s INT $(( $(left) - 10 )) python3 -m artmaster.cli evaluate "${C[@]}" "${E[@]}" 2>&1 \
    | tee "$OUT/evaluate.log" | tail -c 2500
  echo "evaluate rc $? at $(( $(date +%s) - START )) s"
  cp "$DATA_DIR/evaluate/metrics.json" "$OUT/evaluate_metrics.json"
fi
echo "total $(( $(date +%s) - START )) s"
