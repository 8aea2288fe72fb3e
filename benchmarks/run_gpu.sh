#!/usr/bin/env bash
# The GPU benchmarks, one stage per device call (a machine with no network: corpora come from the Python
# sources installed there). Results land in benchmarks/results/ (and are copied into $OUT).
#   bash benchmarks/run_gpu.sh measure     # train a 0.1B model for minutes, fast vs reference search on it
#                                          #   (64K tokens), then the 1.2B shape: timing and memory
#   bash benchmarks/run_gpu.sh big         # 1.2B shape, random weights: timing and peak memory
#   bash benchmarks/run_gpu.sh repeat      # the spread: fast vs reference on two checkpoints of a 0.1B run,
#                                          #   three disjoint 64K-token slices each
#   bash benchmarks/run_gpu.sh curves      # every batch's PPL ratio on 200 taus, two checkpoints x three slices
#   bash benchmarks/run_gpu.sh bigtrained  # train the 1.2B preset for minutes, fast vs reference on it
#                                          #   (64K tokens), then the fast search's memory at 1M tokens
#   bash benchmarks/run_gpu.sh gputests    # the GPU-only tests (CUDA graphs, kernels in every dtype)
#   bash benchmarks/run_gpu.sh trainspeed  # tokens/s and MFU of the 0.1B preset
#   bash benchmarks/run_gpu.sh study       # ReLU vs SiLU of one small preset, tracked, laws fitted
#   bash benchmarks/run_gpu.sh check       # profile, fast vs reference (bf16, a rounding-only change of the
#                                          #   reference, fp32) on the trained 0.1B model
# Stages can be chained: bash benchmarks/run_gpu.sh measure trainspeed
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH=$PWD/src:${PYTHONPATH:-} PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
export SPARSINGLAW_CACHE=/tmp/slcache
export OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SL="python3 -m sparsinglaw"
STDLIB=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["stdlib"])')
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers, triton; print('torch', torch.__version__, 'transformers', transformers.__version__, 'triton', triton.__version__)"
corpus() {  # a corpus from this machine's Python standard library, with a validation split of >= $2 tokens
  python3 -c "from sparsinglaw.data import build_corpus; build_corpus('$1', ['$STDLIB'], vocab_size=16384, min_val_tokens=${2:-131072})"
}
train01() {  # train01 CORPUS OUT TOKENS CKPT_EVERY: the 0.1B preset (SiLU) for minutes on CORPUS
  timeout 300 $SL train --preset 0.1b --act silu --tokens "$3" --seq-len 2048 --batch-size 16 --grad-accum 2 \
    --data "$1" --ckpt-every "$4" --out "$2" --quiet 2>&1 | tail -3
}
r01() {  # the 12M-token run whose 6M and 12M checkpoints `repeat` and `curves` measure (trained once per call)
  [ -d /tmp/runs/r01/checkpoints ] || { corpus /tmp/corpus_r 230000; train01 /tmp/corpus_r /tmp/runs/r01 \
    "${TRAIN_TOKENS:-12M}" 6M; } >&2  # stdout is the checkpoint list
  ls -d /tmp/runs/r01/checkpoints/step-* | tail -2
}
[ $# -gt 0 ] || { echo "usage: $0 measure|check|repeat|curves|big|bigtrained|gputests|trainspeed|study ..."; exit 2; }
for stage in "$@"; do
case "$stage" in
measure)
  corpus /tmp/corpus
  train01 /tmp/corpus /tmp/runs/b01 "${TRAIN_TOKENS:-24M}" 100M
  CK=$(ls -d /tmp/runs/b01/checkpoints/step-* | tail -1)
  cp /tmp/runs/b01/log.jsonl "$OUT/train_0.1b_log.jsonl"
  timeout 240 python3 benchmarks/measure_speed.py --model "$CK" --data /tmp/corpus/val.jsonl --tokens 65536 \
    --seq-len 2048 --batch-size 8 --runs fast,ref1e-6,ref1e-3 --variant 0.1b_trained --out "$OUT" --quiet
  TAUS=$(python3 -c "import json; r=json.load(open('$(ls benchmarks/results/measure_speed_*_0.1b_trained.json | head -1)'))['rows'][0]; print(','.join(str(t) for t in r['taus']))" 2>/dev/null || echo 0.1,0.2,0.17,0.175,0.1745)
  [ -n "${SKIP_12B:-}" ] || timeout 300 python3 benchmarks/measure_speed.py --config 1.2b --random-tokens --tokens 65536 --seq-len 2048 \
    --batch-size 8 --runs fast-replay,ref1e-3 --replay-taus "$TAUS" --memory 65536,1048576 --calib-tokens 65536 \
    --variant 1.2b_random --out "$OUT" --quiet
  ;;
check)  # in one call: where the time goes, fast vs reference in bf16, the reference's own spread
  # under a rounding-only change (flash instead of cuDNN attention), and fast vs reference in fp32
  [ -d /tmp/runs/b01/checkpoints ] || { corpus /tmp/corpus; train01 /tmp/corpus /tmp/runs/b01 "${TRAIN_TOKENS:-12M}" 100M; }
  CK=$(ls -d /tmp/runs/b01/checkpoints/step-* | tail -1)
  M="benchmarks/measure_speed.py --model $CK --data /tmp/corpus/val.jsonl --tokens 65536 --seq-len 2048 --batch-size 8"
  [ -n "${SKIP_PROFILE:-}" ] || { timeout 150 python3 benchmarks/dev/profile_gpu.py measure --model "$CK" \
    --out "$OUT/profile.json" > "$OUT/profile.txt" 2>&1; grep -E "_ms|diff|error|equal|config" "$OUT/profile.txt"; }
  timeout 120 python3 $M --runs fast,ref1e-6,ref1e-3 --variant 0.1b_trained --out "$OUT" --quiet 2>&1 | tail -5
  timeout 60 python3 $M --runs fast,ref1e-6 --no-cudnn-sdpa --variant 0.1b_trained_flash --out "$OUT" --quiet \
    2>&1 | tail -4
  timeout 150 python3 $M --runs fast,ref1e-6 --dtype fp32 --variant 0.1b_trained_fp32 --out "$OUT" --quiet \
    2>&1 | tail -4
  ;;
repeat)  # speed-up and agreement over 6 (model, tokens) pairs: 2 checkpoints x 3 disjoint slices
  for CK in $(r01); do
    timeout 150 python3 benchmarks/measure_speed.py --model "$CK" --data /tmp/corpus_r/val.jsonl --tokens 65536 \
      --slices 3 --seq-len 2048 --batch-size 8 --runs fast,ref1e-6,ref1e-3 --variant "0.1b_repeat_$(basename $CK)" \
      --out "$OUT" --quiet 2>&1 | tail -11
  done
  ;;
curves)  # real F(tau) curves (every batch, 200 taus) of two checkpoints x three slices, for
  # tuning the solver offline: python benchmarks/dev/solver_sim.py --curves benchmarks/results/dev/ppl_curves_*.json
  for CK in $(r01); do
    timeout 200 python3 benchmarks/dev/ppl_curves.py --model "$CK" --data /tmp/corpus_r/val.jsonl --tokens 65536 \
      --slices 3 --variant "0.1b_$(basename $CK)" --out "$OUT" 2>&1 | tail -4
  done
  ;;
bigtrained)  # the 1.2B preset trained for a few minutes (random weights never reach +1% PPL)
  corpus /tmp/corpus12 1150000
  timeout "${TRAIN_S:-270}" $SL train --preset 1.2b --act silu --tokens "${TRAIN_TOKENS:-6M}" --seq-len 2048 \
    --batch-size 4 --grad-accum 8 --data /tmp/corpus12 --ckpt-every 2M --out /tmp/runs/b12 --quiet 2>&1 | tail -3
  cp /tmp/runs/b12/log.jsonl "$OUT/train_1.2b_log.jsonl"
  CK=$(ls -d /tmp/runs/b12/checkpoints/step-* | tail -1)
  M="benchmarks/measure_speed.py --model $CK --data /tmp/corpus12/val.jsonl --seq-len 2048 --batch-size 8 --calib-tokens 65536"
  timeout 230 python3 $M --tokens 65536 --runs fast,ref1e-3,ref1e-6 --variant 1.2b_trained --out "$OUT" --quiet \
    2>&1 | tail -5
  [ -n "${SKIP_MEMORY:-}" ] || timeout 200 python3 $M --tokens 65536 --runs fast --memory 1048576 --variant 1.2b_trained_memory --out "$OUT" \
    --quiet 2>&1 | tail -4
  ;;
big)  # the 1.2B shape with random weights: the fast search's work for the trained model's taus
  # (every tau on every batch: an upper bound), the reference at tol 1e-3, and peak memory at 64K and 1M tokens
  TAUS=$(python3 -c "import json; r=json.load(open('$(ls benchmarks/results/measure_speed_*_0.1b_trained.json | head -1)'))['rows'][0]; print(','.join(str(t) for t in r['taus']))" 2>/dev/null || echo 0.1,0.2,0.17,0.175,0.1745)
  timeout 400 python3 benchmarks/measure_speed.py --config 1.2b --random-tokens --tokens 65536 --seq-len 2048 \
    --batch-size 8 --runs fast-replay,ref1e-3 --replay-taus "$TAUS" --memory 65536,1048576 --calib-tokens 65536 \
    --variant 1.2b_random --out "$OUT" --quiet 2>&1 | tail -6
  ;;
gputests)
  timeout 500 python3 -m pytest -q -p no:cacheprovider tests/test_graphs.py tests/test_cett_mask.py \
    tests/test_cett_update.py tests/test_rope.py tests/test_rmsnorm.py tests/test_causal_attention.py 2>&1 | tail -15
  ;;
trainspeed)
  timeout 300 python3 benchmarks/train_speed.py --out "$OUT"
  ;;
study)
  [ -f /tmp/corpus/corpus.json ] || corpus /tmp/corpus  # its BPE tokenizer is reused for the bigger corpus
  SP=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  timeout 180 python3 -c "from sparsinglaw.data import build_corpus; build_corpus('/tmp/corpus_big', \
    ['$SP/transformers', '$SP/torch', '$SP/sympy', '$SP/scipy', '$STDLIB'], tokenizer='/tmp/corpus')" \
    || cp -r /tmp/corpus /tmp/corpus_big
  for act in relu silu; do
    timeout "${STUDY_TRAIN_S:-170}" $SL train --preset "${STUDY_PRESET:-5m}" --act $act --tokens "${STUDY_TOKENS:-100M}" \
      --ckpt-every "${STUDY_CKPT:-5M}" --data /tmp/corpus_big --out results/study/$act --track-online --quiet 2>&1 | tail -2
    timeout 120 $SL track results/study/$act --p 1 --quiet 2>&1 | tail -4
  done
  $SL fit results/study/relu/series.json results/study/silu/series.json --out results/study/fits 2>&1 | tail -14
  rm -rf results/study/*/checkpoints
  tar czf "$OUT/study.tgz" results/study
  ;;
*) echo "unknown stage $stage; use measure, check, repeat, curves, big, bigtrained, gputests, trainspeed or study"; exit 2 ;;
esac
done
