#!/usr/bin/env bash
# Runs the paper comparison grid (issue 12; python -m alphatune.experiments) for as long as the
# machine is up: niced, resumable, one run after another, results into benchmarks/results/paper.
#
#   nohup benchmarks/paper_grid.sh --threads 2 >> grid.log 2>&1 &
#   .venv/bin/python -m alphatune.experiments list      # done / running / todo / pending
#
# The runs execute from a git worktree of this tree's HEAD (.grid-worktree/), moved to the newest
# HEAD each time this script starts, so editing the tree never changes a run midway and every
# result records a clean commit. Arguments go to the `grid` command (--phase, --threads, ...).
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
make -C "$repo" setup
# The baselines' extras (bitsandbytes for QLoRA); quiet when already installed.
"$repo/.venv/bin/python" -c "import bitsandbytes, pycocoevalcap, peft" 2>/dev/null ||
    "$repo/.venv/bin/pip" install -q -e "$repo[paper]"
tree="$repo/.grid-worktree"
head=$(git -C "$repo" rev-parse HEAD)
if [ -d "$tree" ]; then
    git -C "$tree" checkout -q --detach "$head"
else
    git -C "$repo" worktree add -q --detach "$tree" "$head"
fi
cd "$tree"
export PYTHONPATH="$tree/src"
# The worktree sits inside the repository: point at the shared data beside the repository.
export ALPHATUNE_DATA_DIR="${ALPHATUNE_DATA_DIR:-$(cd "$repo/.." && pwd)/shared/data}"
# The comparison measures quality, not speed: batched generation (16 rows) runs 1.7x faster on
# each layer's dense weight, kept while the scales hold, than on the LUT decode kernel, and gives
# the same tokens (measured on 16 E2E dev prompts).
export ALPHATUNE_KERNEL="${ALPHATUNE_KERNEL:-reference}"
# The WikiText-2 perplexity of each base cached since the last start (a minute each, once).
nice -n 10 "$repo/.venv/bin/python" -m alphatune.experiments \
    --results "$repo/benchmarks/results/paper" bases --threads 2 ||
    echo "measuring the bases failed; the grid goes on" >&2
exec nice -n 10 "$repo/.venv/bin/python" -m alphatune.experiments \
    --results "$repo/benchmarks/results/paper" grid "$@"
