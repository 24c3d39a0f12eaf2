#!/usr/bin/env bash
# One call on the GPU machine answers everything: build the extension, run the GPU
# tests (kernels, attention, model vs transformers, engine), compute-sanitizer, the
# dev/cuda programs (each checks itself and times its versions), the benchmarks, and
# print a short table last.
#
#   bash scripts/gpu_check.sh [build] [test] [sanitize] [dev] [bench] [e2e] [profile]   (default: all)
#   bash scripts/gpu_check.sh build attn battn    (attention only: its tests, its benchmark)
#   bash scripts/gpu_check.sh build ragged        (decode batches of unequal lengths)
#   bash scripts/gpu_check.sh build gemm          (the skinny GEMM: its tests, memcheck, dev program, benchmark)
#   bash scripts/gpu_check.sh build gemmbench host  (the GEMM benchmark alone; the host's time per step, bench_host.py)
#   bash scripts/gpu_check.sh build e2e profile   (end to end, then the decode-step anatomy)
#   bash scripts/gpu_check.sh build features serve   (prefix caching and chunked prefill on/off;
#       tinyvllm serve under tinyvllm bench serve at 1, 4 and inf requests/s against offline LLM.generate.
#       The GPU machine has no fastapi/uvicorn/aiohttp/openai/gguf and no network: download their
#       wheels here first, `pip download --only-binary=:all: --python-version 3.12 --platform
#       manylinux2014_x86_64 -d .whl fastapi uvicorn aiohttp openai gguf` (then delete the numpy,
#       tqdm, requests, urllib3, certifi, charset_normalizer and idna wheels the machine has), and
#       carry .whl: this script unpacks them onto PYTHONPATH.
#       SERVE_ARGS="--stream-intervals 10" adds a run at rate inf with `serve --stream-interval 10`.)
#   E2E_ARGS="--skip-compile --workloads latency,nano" bash scripts/gpu_check.sh build e2e
#       (bench/bench_e2e.py's options: --skip-hf, --skip-compile, --skip-eager, --workloads,
#        --random-requests N; it prints the expected seconds of each part first. The whole e2e
#        phase is about 7 minutes on an H100, the torch.compile peer 4 of them.)
#   PROFILE_ARGS="--batches 1,64,256 --prompt-len 512" bash scripts/gpu_check.sh build profile
#       (--prefill-len 1024 adds the `random` workload's prompt steps: 256 prompts of 1024 tokens)
#       (the Chrome traces go to /tmp/tinyvllm_traces, since the device tool brings back at most
#        8 files; PROFILE_TRACE_DIR=$OUT/traces brings them back, one per batch size)
#
# Results (logs, JSON, PNG) go to $OUT (the device tool's folder) or ./out; PACK_OUT=1 packs them
# into one $OUT/results.tgz at the end (the device tool brings back at most 8 files).
#
# What the open issues still need, in one call of about 7 minutes (`.whl` carried):
#   PACK_OUT=1 SERVE_ARGS="--stream-intervals 10 --in-process" \
#     E2E_ARGS="--skip-hf --skip-compile --skip-eager --workloads latency" \
#     bash scripts/gpu_check.sh build gemmbench e2e serve
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if compgen -G ".whl/*.whl" >/dev/null; then  # wheels carried from the development machine (see above)
  mkdir -p /tmp/tinyvllm_site
  for w in .whl/*.whl; do python3 -c "import sys, zipfile; zipfile.ZipFile(sys.argv[1]).extractall('/tmp/tinyvllm_site')" "$w"; done
  export PYTHONPATH=/tmp/tinyvllm_site:$PYTHONPATH
fi
phases=${*:-build test sanitize dev bench e2e profile}
ATTN_TESTS="tests/test_decode_attention.py tests/test_decode_plan.py tests/test_decode_graphs.py tests/test_prefill_attention.py tests/test_prefill_tiles.py tests/test_read_floor.py"
summary=()
note() { summary+=("$1"); echo ">>> $1"; }
has() { [[ " $phases " == *" $1 "* ]]; }

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu.txt"
python3 -c 'import torch, transformers; print("torch", torch.__version__, "cuda", torch.version.cuda, "transformers", transformers.__version__)'

if has build; then
  t0=$(date +%s)
  if python3 setup.py build_ext --inplace >"$OUT/build.log" 2>&1; then
    note "build: ok ($(( $(date +%s) - t0 )) s)"
  else
    tail -40 "$OUT/build.log"; note "build: FAILED"
  fi
  python3 -c 'import torch, tinyvllm._C; print("ops:", [n for n in ("rms_norm", "paged_attention_decode", "prefill_attention") if hasattr(torch.ops.tinyvllm, n)])'
  python3 -c 'import tinyvllm._C' && note "import tinyvllm._C before torch: ok" || note "import tinyvllm._C before torch: FAILED"
  python3 -c 'import tinyvllm, tinyvllm.ops' && note "import tinyvllm.ops: ok" || note "import tinyvllm.ops: FAILED"
fi

if has test; then
  python3 -m pytest -q -rs -p no:cacheprovider \
    tests/test_kernels.py $ATTN_TESTS tests/test_model_vs_transformers.py tests/test_rope.py \
    tests/test_engine.py tests/test_llm_api.py tests/test_sampler.py tests/test_model_runner.py \
    tests/test_engine_config.py tests/test_cuda_graphs.py tests/test_logprobs.py tests/test_logits_processors.py \
    tests/test_parallel_sampling.py tests/test_skinny_gemm.py tests/test_async_scheduling.py \
    tests/test_prefix_caching.py tests/test_chunked_prefill.py tests/test_rope_and_cache.py tests/test_input_batch.py \
    tests/test_engine_core.py tests/test_output_kinds.py 2>&1 | tee "$OUT/pytest_gpu.log"
  note "gpu tests: $(grep -E '(passed|failed|error)' "$OUT/pytest_gpu.log" | tail -1)"
fi

if has attn; then
  python3 -m pytest -q -rs -p no:cacheprovider $ATTN_TESTS 2>&1 | tail -30 | tee "$OUT/pytest_attn.log"
  note "attention tests: $(grep -E '(passed|failed|error)' "$OUT/pytest_attn.log" | tail -1)"
fi

if has sanitize; then
  # racecheck is the slow one (6 minutes for the whole set on an H200): give it a device
  # call of its own, `SANITIZE_TOOLS=racecheck bash scripts/gpu_check.sh build sanitize`.
  # SANITIZE_K (pytest's -k, e.g. "decode", then "not decode") splits the set further.
  for tool in ${SANITIZE_TOOLS:-memcheck racecheck}; do
    timeout ${SANITIZE_TIMEOUT:-540} compute-sanitizer --tool $tool --error-exitcode 9 python3 -m pytest -q -x -p no:cacheprovider -m sanitize \
      -k "${SANITIZE_K:-}" tests/test_kernels.py tests/test_skinny_gemm.py tests/test_rope_and_cache.py $ATTN_TESTS >"$OUT/sanitizer_$tool.log" 2>&1
    rc=$?
    note "compute-sanitizer $tool: rc=$rc, $(grep -E '(ERROR|RACECHECK) SUMMARY' "$OUT/sanitizer_$tool.log" | tail -1) $(grep -E '(passed|failed)' "$OUT/sanitizer_$tool.log" | tail -1)"
  done
fi

if has dev; then  # dev/cuda: build every program, run each (it checks itself, exits 1 on a mismatch, then times)
  t0=$(date +%s)
  python3 dev/cuda/build.py --out "$PWD/build/dev" >"$OUT/dev_build.log" 2>&1
  note "dev build: rc=$? ($(( $(date +%s) - t0 )) s; dev_build.log)"
  for prog in $(python3 dev/cuda/build.py --list | cut -d: -f1); do
    if [[ -x build/dev/$prog ]]; then
      timeout ${DEV_TIMEOUT:-300} build/dev/$prog >"$OUT/dev_$prog.log" 2>&1
      rc=$?
      [[ $rc == 0 ]] && note "dev $prog: passed (dev_$prog.log)" || note "dev $prog: FAILED rc=$rc ($(grep -m1 -E 'MISMATCH|FAILED|error' "$OUT/dev_$prog.log"))"
    else
      note "dev $prog: FAILED to build (dev_build.log)"
    fi
  done
fi

if has bench; then
  python3 bench/bench_kernels.py --out "$OUT/kernels.json" 2>&1 | tee "$OUT/bench_kernels.log"
  note "bench_kernels rc=${PIPESTATUS[0]}"
  python3 bench/bench_attention.py --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench_attention.log"
  note "bench_attention rc=${PIPESTATUS[0]}"
  python3 bench/bench_gemm.py --smollm2 --out "$OUT/gemm.json" 2>&1 | tee "$OUT/bench_gemm.log"
  note "bench_gemm rc=${PIPESTATUS[0]}: $(grep -E '^M = 1,' "$OUT/bench_gemm.log" | cut -c1-90)"
fi

if has gemm; then  # the skinny GEMM alone: tests, memcheck of its sanitize subset, the dev program, the benchmark
  python3 -m pytest -q -rs -p no:cacheprovider tests/test_skinny_gemm.py tests/test_kernels.py -k "linear or skinny" \
    2>&1 | tee "$OUT/pytest_gemm.log"
  note "gemm tests: $(grep -E '(passed|failed|error)' "$OUT/pytest_gemm.log" | tail -1)"
  timeout ${SANITIZE_TIMEOUT:-540} compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x \
    -p no:cacheprovider -m sanitize tests/test_skinny_gemm.py >"$OUT/sanitizer_gemm.log" 2>&1
  note "compute-sanitizer memcheck (gemm): rc=$?, $(grep -E 'ERROR SUMMARY' "$OUT/sanitizer_gemm.log" | tail -1)"
  python3 dev/cuda/build.py skinny_gemm --out "$PWD/build/dev" >"$OUT/dev_build_gemm.log" 2>&1 \
    && timeout ${DEV_TIMEOUT:-300} build/dev/skinny_gemm >"$OUT/dev_skinny_gemm.log" 2>&1
  rc=$?
  [[ $rc == 0 ]] && note "dev skinny_gemm: passed (dev_skinny_gemm.log)" || note "dev skinny_gemm: FAILED rc=$rc (dev_build_gemm.log, dev_skinny_gemm.log)"
  python3 bench/bench_gemm.py --smollm2 --out "$OUT/gemm.json" 2>&1 | tee "$OUT/bench_gemm.log"
  note "bench_gemm rc=${PIPESTATUS[0]}"
  while read -r line; do note "  $line"; done < <(grep -A3 -E '^M = 1,' "$OUT/bench_gemm.log")
fi

if has gemmbench; then  # the GEMM benchmark alone (each linear against torch.matmul, cuBLAS and a copy of its own bytes)
  python3 bench/bench_gemm.py --smollm2 --out "$OUT/gemm.json" 2>&1 | tee "$OUT/bench_gemm.log"
  note "bench_gemm rc=${PIPESTATUS[0]}"
  while read -r line; do note "  $line"; done < <(grep -A3 -E '^M = 1,' "$OUT/bench_gemm.log")
fi

if has host; then  # this machine's host speed: the engine's host time per step at batch 256 (compare host-bound numbers only within a call)
  for mode in final wire; do
    python3 bench/bench_host.py --outputs "$mode" --out "$OUT/host_$mode.json" > "$OUT/bench_host_$mode.log" 2>&1
    note "bench_host --outputs $mode: $(tail -1 "$OUT/bench_host_$mode.log")"
  done
fi

if has battn; then
  python3 bench/bench_attention.py --out "$OUT/attention.json" 2>&1 | tee "$OUT/bench_attention.log"
  note "bench_attention rc=${PIPESTATUS[0]}"
fi

if has ragged; then  # decode batches of unequal lengths (the engine's order and sum against the op's old way)
  python3 bench/bench_attention.py --ragged-only --out "$OUT/attention_ragged.json" 2>&1 | tee "$OUT/bench_attention_ragged.log"
  note "bench_attention --ragged-only rc=${PIPESTATUS[0]}"
fi

if has e2e; then  # e2e.json, e2e.png; a part that fails is in the JSON's "errors" (rc=1), the others still run
  python3 bench/bench_e2e.py --out "$OUT/e2e.json" ${E2E_ARGS:-} 2>&1 | tee "$OUT/bench_e2e.log"
  note "bench_e2e rc=${PIPESTATUS[0]} ($(grep -m1 -E '^tinyvllm ' "$OUT/bench_e2e.log" | tr -s ' '))"
fi

if has features; then  # features.json: prefix caching and chunked prefill, each on and off
  python3 bench/bench_features.py --out "$OUT/features.json" 2>&1 | tee "$OUT/bench_features.log"
  note "bench_features rc=${PIPESTATUS[0]}"
fi

if has serve; then  # serve.json: the online workload against offline LLM.generate (about 2 minutes)
  python3 bench/bench_serve.py --out "$OUT/serve.json" ${SERVE_ARGS:-} 2>&1 | tee "$OUT/bench_serve.log"
  note "bench_serve rc=${PIPESTATUS[0]}: $(grep -E '^saturation' "$OUT/bench_serve.log")"
  note "serve CPU busy (server / engine / client): $(grep -E '^ *inf(/[0-9]+)?: [0-9.-]+ / ' "$OUT/bench_serve.log" | tr -s ' ' | tr '\n' ';')"
fi

if has profile; then  # step_anatomy.json/.md: graph-replayed decode steps, kernels by kind and GPU idle time (about 1 minute)
  python3 bench/profile_step.py --out "$OUT/step_anatomy.json" --trace-dir "${PROFILE_TRACE_DIR:-/tmp/tinyvllm_traces}" ${PROFILE_ARGS:-} 2>&1 \
    | tee "$OUT/profile_step.log"
  note "profile_step rc=${PIPESTATUS[0]} (step_anatomy.md)"
fi

echo
echo "================ summary ($(cat "$OUT/gpu.txt")) ================"
printf '%s\n' "${summary[@]}"
if [[ -n "${PACK_OUT:-}" ]]; then  # one archive: the device tool brings back at most 8 files
  printf '%s\n' "${summary[@]}" > "$OUT/summary.txt"
  tar czf /tmp/gpu_check_results.tgz -C "$OUT" . && find "$OUT" -mindepth 1 -delete \
    && mv /tmp/gpu_check_results.tgz "$OUT/results.tgz" && echo "packed into $OUT/results.tgz"
fi
