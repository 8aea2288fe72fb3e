#!/usr/bin/env bash
# One call on a GPU machine that keeps nothing between sittings and gives a command at most 10 minutes:
# continue study NAME (studies/NAME.toml) for at most MINUTES minutes (default 8), then copy what the
# report needs (series, logs, fits, PNGs, report.html; no checkpoints or trainer states) to $OUT/NAME.tgz.
# Run it again (same warm machine) until it prints "study complete". Finished runs committed under
# results/NAME are copied in first, so a fresh machine does not redo them.
#   usage: bash studies/gpu_run.sh NAME [MINUTES]
set -uo pipefail
cd "$(dirname "$0")/.."
name=${1:?usage: bash studies/gpu_run.sh NAME [MINUTES]}
minutes=${2:-8}
dir=out/studies/$name
mkdir -p "$dir"
if [ -d "results/$name/runs" ]; then
  for run in results/"$name"/runs/*/; do  # only finished runs: an unfinished one restarts here anyway
    [ -f "$run/run.json" ] && [ ! -f "$dir/runs/$(basename "$run")/run.json" ] && \
      mkdir -p "$dir/runs" && cp -r "$run" "$dir/runs/"
  done
fi
PYTHONPATH=src python -m sparsinglaw study "studies/$name.toml" --out "$dir" --stop-after "$minutes" \
  --delete-checkpoints --quiet
rc=$?
if [ -n "${OUT:-}" ]; then  # one archive: the device tool brings back at most 8 files, 2 folders deep
  tar czf "$OUT/$name.tgz" --exclude=checkpoints --exclude=paused_state.pt --exclude=tensorboard -C "$(dirname "$dir")" "$name"
fi
exit $rc
