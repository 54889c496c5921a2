#!/usr/bin/env bash
# GPU check of the adapter types, under 8 minutes on one GPU: SD1.5 512 px and SDXL 1024 px, bf16, batch 1, s/it and
# peak CUDA memory of LoRA/LoCon and each adapter type on the same modules (sdlora's fast path; on SD1.5 also the
# LyCORIS reference modules), each beside the memory estimate's traced step for the same settings
# (sdlora.training.memory.trace_step_bytes, what bench/memory_estimate.py and `train` use). Prints a Markdown
# table for bench/RESULTS.md at the end.
#
#   bash bench/gpu_check.sh                  # PYTHON=... to choose the interpreter, OUT=... for the logs and JSON
#
# Every run has its own time limit, so one that hangs or runs out of memory costs its slot and not the check; what
# finished is in $OUT/*.json and in the table.
set -u
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT:-/tmp/sdlora_gpu_check}
# The reference's eager torch path: its triton/compile tiers compile on first use (minutes). LYCORIS_KERNEL_BACKEND=auto
# measures those instead.
export LYCORIS_KERNEL_BACKEND=${LYCORIS_KERNEL_BACKEND:-torch}
export HF_HUB_OFFLINE=1
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.get_device_name(0))"

run() {  # name, time limit (s), adapter_speed arguments...
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit}s)"
    timeout --kill-after=10 "$limit" "$PY" bench/adapter_speed.py --device cuda --precision bf16 \
        --json "$OUT/$name.json" "$@" 2>&1 | grep -v -i "warn" | tee "$OUT/$name.log"
}

# The traced estimate runs on the CPU (fake tensors): every SD1.5 row, the SDXL rows of LoRA, LoHa and DoRA.
run sd15-512 200 --model sd15 --resolution 512 --steps 5 --estimate
run sdxl-1024 170 --model sdxl --resolution 1024 --steps 3 --paths fast --estimate lora,locon,loha,dora
run sdxl-1024-reference 70 --model sdxl --resolution 1024 --steps 2 --paths reference --types lokr

"$PY" - "$OUT" <<'EOF'
import json, sys
from pathlib import Path

out = Path(sys.argv[1])
print("\n| model | px | type | path | s/it | x base | step MiB | x base | peak MiB | x base | estimate MiB | est/step |")
print("|---|---|---|---|---|---|---|---|---|---|---|---|")
for name in ("sd15-512", "sdxl-1024", "sdxl-1024-reference"):
    path = out / f"{name}.json"
    if not path.exists():
        print(f"| {name} | | (no result: see {name}.log) | | | | | | | | | |")
        continue
    data = json.loads(path.read_text())
    rows, args = data["rows"], data["args"]
    base = {r["type"]: r for r in rows if r["path"] == "peft"}
    for r in rows:
        b = base.get(r["baseline"])
        ratio = lambda k: f"{r[k] / b[k]:.2f}" if b else "-"  # noqa: E731
        est = r.get("estimate_mib")
        est_cells = f"{est:.0f} | {est / r['step_mib']:.3f}" if est else "- | -"
        print(f"| {args['model']} | {args['resolution']} | {r['label']} | {r['path']} | {r['s_per_step']:.3f} | "
              f"{ratio('s_per_step')} | {r['step_mib']:.0f} | {ratio('step_mib')} | {r['peak_mib']:.0f} | "
              f"{ratio('peak_mib')} | {est_cells} |")
EOF
