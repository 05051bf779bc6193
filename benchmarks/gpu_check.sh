#!/usr/bin/env bash
# One GPU check of the real Qwen3-VL-4B architecture (random weights from the bundled config, no download), at most
# 8 minutes on one GPU, written as ONE JSON file:
#   - bf16 LoRA training at batch 4 (512 px), without and with gradient checkpointing: samples/s, peak GPU memory
#     (benchmarks/bench_train.py: the full training step and a bare forward+backward);
#   - QLoRA (NF4) at batch 4, if bitsandbytes imports; else "unavailable: bitsandbytes not installed";
#   - counting forwards/s at batch 16 on marked 576 x 384 images (benchmarks/bench_forward.py).
#
#   benchmarks/gpu_check.sh [OUT.json]             # default: $OUT/gpu_check.json, else ./gpu_check.json
#   GPU_CHECK_CPU=1 benchmarks/gpu_check.sh x.json  # the same parts with the tiny model, 1 step each, on CPU (a test)
#
# Each part runs in its own process (a clean peak-memory figure; one failure or OOM does not stop the others) under a
# time limit taken from one overall budget (GPU_CHECK_BUDGET_S, default 420 s); a part that fails or runs out of time
# is recorded as {"error": ...} with the end of its log. Needs no wandb, bitsandbytes or network (HF_HUB_OFFLINE=1).
# The random weights (8.9 GB) are built once in $VLM_REGRESSION_CACHE (default: the repository's .cache, where a
# carried tiny model is found).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-.}/gpu_check.json}
py=${PYTHON:-python3}
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1 WANDB_MODE=disabled
export VLM_REGRESSION_CACHE=${VLM_REGRESSION_CACHE:-$PWD/.cache}
budget=${GPU_CHECK_BUDGET_S:-420}
parts=$(mktemp -d)
trap 'rm -rf "$parts"' EXIT

if [ -n "${GPU_CHECK_CPU:-}" ]; then  # the script's own test: every part, as small as it goes
  model=(--model_name tiny-random)
  train=(--batch_size 2 --image_size 64 --steps 1 --warmup 0 --num_workers 0)
  count=(--batch_size 2 --width 64 --height 64 --objects 4 --steps 1 --warmup 0)
else
  model=(--model_name Qwen/Qwen3-VL-4B-Thinking --random_weights)
  train=(--batch_size 4 --image_size 512 --steps 5 --warmup 2)
  count=(--batch_size 16 --width 576 --height 384 --steps 5 --warmup 2)
fi

part() {  # part NAME COMMAND...: stdout's last line (JSON) to $parts/NAME.json, or an error record
  local name=$1 left=$((budget - SECONDS)) start=$SECONDS
  shift
  if [ "$left" -lt 10 ]; then
    echo "{\"error\": \"not run: the ${budget} s budget was spent\"}" >"$parts/$name.json"
    return
  fi
  echo "== $name (limit ${left} s)" >&2
  if timeout "$left" "$@" >"$parts/$name.out" 2>"$parts/$name.log" && tail -n 1 "$parts/$name.out" | "$py" -c \
      "import json,sys; json.load(sys.stdin)" 2>/dev/null; then
    tail -n 1 "$parts/$name.out" >"$parts/$name.json"
  else
    local rc=$?
    "$py" -c 'import json,sys; print(json.dumps({"error": f"exit {sys.argv[1]}" + (" (time limit)" if sys.argv[1] == "124" else ""), "log_tail": open(sys.argv[2], errors="replace").read()[-2000:]}))' \
      "$rc" "$parts/$name.log" >"$parts/$name.json"
  fi
  echo "   $((SECONDS - start)) s: $(head -c 300 "$parts/$name.json")" >&2
}

if [ -z "${GPU_CHECK_CPU:-}" ]; then  # the weights first, so no timed part pays for building them
  part random_weights "$py" -c "import json, time; import tiny_model as t; s = time.time(); \
d = t.random_weights_dir('Qwen/Qwen3-VL-4B-Thinking'); print(json.dumps({'dir': d, 'seconds': round(time.time() - s, 1)}))"
fi
part lora_bf16 "$py" benchmarks/bench_train.py "${model[@]}" "${train[@]}" --json
part lora_bf16_gradient_checkpointing "$py" benchmarks/bench_train.py "${model[@]}" "${train[@]}" \
  --gradient_checkpointing --json
if "$py" -c "import bitsandbytes" 2>/dev/null; then
  part qlora_nf4 "$py" benchmarks/bench_train.py "${model[@]}" "${train[@]}" --load_in_4bit --json
else
  echo '{"unavailable": "bitsandbytes not installed"}' >"$parts/qlora_nf4.json"
fi
part counting_forwards "$py" benchmarks/bench_forward.py "${model[@]}" "${count[@]}" --json

mkdir -p "$(dirname "$out")"
"$py" - "$parts" "$out" "$SECONDS" <<'EOF'
import importlib.metadata as md, json, os, platform, sys

parts, out, seconds = sys.argv[1], sys.argv[2], int(sys.argv[3])
result = {"seconds": seconds, "python": platform.python_version()}
for name in ("torch", "transformers", "peft", "accelerate", "bitsandbytes", "flash_attn"):
    try:
        result[name] = md.version(name)
    except md.PackageNotFoundError:
        result[name] = None
try:
    import torch
    result["device"] = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
except Exception as e:  # the record still gets written
    result["device"] = f"unknown ({e})"
for name in ("random_weights", "lora_bf16", "lora_bf16_gradient_checkpointing", "qlora_nf4", "counting_forwards"):
    path = os.path.join(parts, name + ".json")
    if os.path.exists(path):
        with open(path) as f:
            result[name] = json.load(f)
with open(out, "w") as f:
    json.dump(result, f, indent=1)
print(json.dumps(result, indent=1))
EOF
echo "wrote $out" >&2
