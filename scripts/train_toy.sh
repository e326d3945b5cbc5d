#!/usr/bin/env bash
# Trains MemFlow-Tiny from scratch on the story world (2 CPU cores) and copies the release into
# checkpoints/memflow-tiny/. Stage by stage, each skipped when its output already exists (rerun to resume):
#   0. prompts   training prompts of training-split seeds (clip prompts, return clips mixed in as the teacher's)
#                                                               -> prompts/toy/{train,switch_first,switch_second}.txt
#   1. vae       tiny AutoencoderKLWan on images, inflated to video (configs/toy/vae.yaml) -> logs/toy/release/vae/
#   2. teacher   bidirectional DiT, flow matching on cached VAE latents of clips (and of return clips when
#                return_fraction > 0: a subject named by none of its attributes, a cut away, its return;
#                configs/toy/teacher.yaml)
#                                                               -> logs/toy/release/transformer/
#   3. ode_init  teacher ODE pairs + causal regression (scripts/train.py, configs/toy/ode_init.yaml)
#                                                               -> logs/toy/ode_init/base.pt
#   4. init      stage 1 Self-Forcing DMD with NAM (configs/toy/train_init.yaml)   -> logs/toy/train_init/base.pt
#   5. long      stage 2 streaming long tuning, LoRA, prompt switches (configs/toy/train_long.yaml)
#                                                               -> logs/toy/train_long/lora.pt
#   6. package   stage-1 generator + merged stage-2 LoRA, VAE and teacher as safetensors, RELEASE.json
#                                                               -> checkpoints/memflow-tiny/
# Logs: logs/toy/<stage>.log; wall seconds and git commit per stage: logs/toy/timings.json (RELEASE.json repeats them,
# so a release resumed on stages of an earlier run says which commit trained each part).
# usage: bash scripts/train_toy.sh [OUT_DIR]    (default checkpoints/memflow-tiny)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PYTHON="$ROOT/.venv/bin/python"
[ -x "$PYTHON" ] || PYTHON=python
OUT="${1:-checkpoints/memflow-tiny}"
LOGS=logs/toy
TIMINGS="$LOGS/timings.json"
mkdir -p "$LOGS"
[ -f "$TIMINGS" ] || echo '{}' > "$TIMINGS"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-2}"  # all of a 2-core machine; set 1 when sharing it

record() {  # record STAGE SECONDS and the commit that ran it into timings.json
    "$PYTHON" - "$TIMINGS" "$1" "$2" "$(git rev-parse HEAD 2>/dev/null || echo unknown)" <<'EOF'
import json, sys
path, stage, seconds, commit = sys.argv[1], sys.argv[2], float(sys.argv[3]), sys.argv[4]
data = json.load(open(path))
data[stage] = {"seconds": seconds, "commit": commit}
json.dump(data, open(path, "w"), indent=2)
EOF
}

stage() {  # stage NAME DONE_FILE COMMAND...
    local name="$1" done_file="$2"
    shift 2
    if [ -e "$done_file" ]; then
        echo "== $name: done ($done_file)"
        return
    fi
    echo "== $name: running, log $LOGS/$name.log"
    local start=$SECONDS
    "$@" > "$LOGS/$name.log" 2>&1
    record "$name" $((SECONDS - start))
    echo "== $name: $((SECONDS - start)) s"
}

stage prompts prompts/toy/switch_second.txt "$PYTHON" scripts/train_toy.py prompts --count 2000
stage vae "$LOGS/release/vae/config.json" "$PYTHON" scripts/train_toy.py vae
stage teacher "$LOGS/release/transformer/diffusion_pytorch_model.safetensors" "$PYTHON" scripts/train_toy.py teacher
stage ode_init "$LOGS/ode_init/base.pt" "$PYTHON" scripts/train.py --stage ode_init \
    --config_path configs/toy/ode_init.yaml --logdir "$LOGS/ode_init"
stage train_init "$LOGS/train_init/base.pt" "$PYTHON" scripts/train.py --stage init \
    --config_path configs/toy/train_init.yaml --logdir "$LOGS/train_init"
stage train_long "$LOGS/train_long/lora.pt" "$PYTHON" scripts/train.py --stage long \
    --config_path configs/toy/train_long.yaml --logdir "$LOGS/train_long"
"$PYTHON" scripts/train_toy.py package --release "$LOGS/release" --stage1 "$LOGS/train_init" \
    --stage2 "$LOGS/train_long" --out "$OUT" --timings "$TIMINGS" --command "bash scripts/train_toy.sh $*"
