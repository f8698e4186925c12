#!/usr/bin/env bash
# One device call: install, GPU tests of the given files (default: everything),
# then the benchmarks, logs under $OUT (or ./gpu_logs). Usage on the device machine:
#   source .device/setup.sh && bash benchmarks/run_gpu.sh [pytest targets...]
set -uo pipefail
cd "$(dirname "$0")/.."
LOG=${OUT:-gpu_logs}; mkdir -p "$LOG"
# kernels prebuilt on the CPU machine (benchmarks/prebuild.py) load from .device/cfcache
export CF_CUTE_CACHE_DIR=${CF_CUTE_CACHE_DIR:-$PWD/.device/cfcache}
export CF_CUTE_COMMIT=${CF_CUTE_COMMIT:-unknown}
python -m pip install -q --no-deps --no-build-isolation -e . > "$LOG/pip.log" 2>&1 || { tail "$LOG/pip.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$LOG/gpu.txt"
python -c "from cf_cute.primitives import max_resident_clusters as m; print('resident clusters at 1 CTA/SM:', {c: m(c) for c in (1, 2, 4, 8, 16)})" | tee -a "$LOG/gpu.txt"
targets=("$@"); [ ${#targets[@]} -eq 0 ] && targets=(tests)
timeout "${TEST_TIMEOUT:-300}" python -m pytest -q --maxfail=8 -m gpu "${targets[@]}" 2>&1 | tee "$LOG/pytest.log" | tail -5
if [ -z "${SKIP_BENCH:-}" ]; then
  timeout 60 python benchmarks/bench_host_overhead.py > "$LOG/host.md" 2>&1; tail -8 "$LOG/host.md"
  timeout "${BENCH_TIMEOUT:-240}" python benchmarks/bench_layer.py ${LAYER_ARGS:-} > "$LOG/layer.md" 2>&1
  tail -20 "$LOG/layer.md"
  timeout "${BENCH_TIMEOUT:-240}" python benchmarks/bench_attention.py ${ATTN_ARGS:---context 1024,4096 --batch 1,16} \
    > "$LOG/attention.md" 2>&1; tail -12 "$LOG/attention.md"
fi
if [ -n "${EXTRA_BENCH:-}" ]; then   # the rows the issues still lack (session 4's list)
  timeout 90 python benchmarks/bench_phases.py --block mlp --batch 1,16 > "$LOG/phases_mlp.md" 2>&1
  timeout 200 python benchmarks/bench_mla.py --context 1024,4096,16384,32768 --batch 1,16 > "$LOG/mla.md" 2>&1
  timeout 60 python benchmarks/bench_phases.py --context 1024 --heads 32 --kv-heads 8 > "$LOG/phases_gqa.md" 2>&1
  timeout 200 python benchmarks/bench_attention.py --context 1024,4096 --batch 1,16 --heads 32 --kv-heads 8 \
    > "$LOG/attention_gqa.md" 2>&1
  timeout 400 python -m cf_cute bench --model llama-3-8b --context 1024,4096,16384 --batch 1,16 > "$LOG/model_l3.md" 2>&1
  tail -8 "$LOG/mla.md" "$LOG/attention_gqa.md" "$LOG/model_l3.md"
fi
