#!/usr/bin/env bash
# Train a small model and prune its checkpoint folder side by side, then resume the run.
# Usage: bash scripts/demo.sh [LOG_DIR]   (default: a new folder under /tmp)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/venv.sh

log_dir=${1:-$(mktemp -d /tmp/ckpt-demo.XXXXXX)}
folder="$log_dir/checkpoints"
mkdir -p "$folder"
echo "== log dir: $log_dir"

steps_on_disk() {
  (cd "$folder" && ls model_v2_step*.pt 2>/dev/null) | sed -E 's/model_v2_step([0-9]+)_.*/\1/' \
    | sort -n | tr '\n' ' '
}

show_folder() {
  echo "== $(date +%T) checkpoints on disk: $(steps_on_disk)"
}

# Wait until the watcher has handled the last save: the folder stays the same for 1 s (at most
# 15 s), which a busy machine can need.
settle_then_show() {
  local before after
  after=$(steps_on_disk)
  for _ in $(seq 15); do
    before=$after
    sleep 1
    after=$(steps_on_disk)
    [ "$before" = "$after" ] && break
  done
  show_folder
}

# The watcher keeps the newest 2 checkpoints of each run plus every 100th step.
python -m watcher "$folder" --keep-last 2 --keep-every 100 &
watcher_pid=$!
trap 'kill -TERM "$watcher_pid" 2>/dev/null || true' EXIT

python -m trainer --steps 300 --save-every-steps 20 --log-dir "$log_dir" &
trainer_pid=$!
while kill -0 "$trainer_pid" 2>/dev/null; do
  show_folder
  sleep 2
done
wait "$trainer_pid"
settle_then_show

echo "== resuming from the newest valid checkpoint and training to step 400"
python -m trainer --steps 400 --save-every-steps 20 --log-dir "$log_dir" --resume
settle_then_show

kill -TERM "$watcher_pid"
wait "$watcher_pid"
trap - EXIT
echo "== done: the folder keeps milestones 100, 200, 300, 400 and the newest two other steps"
