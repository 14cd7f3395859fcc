#!/usr/bin/env bash
# Build, test and benchmark on the GPU machine in one call: bash benchmarks/device_run.sh STAGE...
# Stages: build (CUDA extension + C++ tests; buildext: the extension only), sanitize (compute-sanitizer + SASS/resource checks),
#         sanitizetriton (memcheck of the Triton decode schedules with hostile indices), cbench (C++
#         timing of the CUDA forward: dynamic/static tile assignment, wide kernel),
#         test (GPU pytest suites), bench (side-by-side table), decode (kvcache decode table),
#         varlen (varlen vs dense table), prefill (chunked prefill vs flash-attn3-jax, PREFILL_ARGS),
#         sweep (Triton tile/variant sweep, SWEEP_ARGS),
#         ab (C++ timing of d=128 bf16 kernel variants built side by side, AB_VARIANTS), abbin (the same for
#         test programs built elsewhere, AB_BINS), cverify (checks + memcheck of prebuilt test programs, CHECK_BINS),
#         ncu (Nsight Compute source-level profile of one C++ bench case and of flash-attn3-jax's kernel),
#         ncutriton (Nsight Compute sections of the Triton forward and flash-attn3-jax's, via profile_fwd.py),
#         ncudecode (the same for the decode kernels, via profile_decode.py).
# Wheels the machine lacks (jax-triton, nvidia-cutlass, flash-attn3-jax) travel in .whl/ (see the device README).
# Prints a short summary table last; logs go to $OUT, packed into $OUT/logs.tgz on exit.
set -uo pipefail
OUT=${OUT:-/tmp/fa3jax-out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
# the device gets a tree without .git: pass FA3JAX_COMMIT=$(git rev-parse --short HEAD) from here for RESULTS.md
# FA3JAX_NO_WHEELS=1: a second invocation beside a running one (e.g. buildext in the background) skips the install
[ -n "${FA3JAX_NO_WHEELS:-}" ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl || { echo "wheel install failed"; exit 1; }
export PYTHONPATH=/tmp/site:$PWD
# The GPU suites are compile-bound. Compiled Triton kernels and XLA executables persist across device calls when
# .device_cache travels: unpack a previous call's $OUT/device_cache.tgz into .device_cache and carry it.
mkdir -p .device_cache/triton .device_cache/jax
export TRITON_CACHE_DIR=$PWD/.device_cache/triton JAX_COMPILATION_CACHE_DIR=$PWD/.device_cache/jax
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=1
save_cache() {  # carry limit is 64 MiB for everything: keep the archive well under it
  tar czf "$OUT/device_cache.tgz" -C .device_cache . 2>/dev/null
  [ "$(stat -c %s "$OUT/device_cache.tgz" 2>/dev/null || echo 0)" -lt $((48 << 20)) ] || rm -f "$OUT/device_cache.tgz"
}
# At most 8 files come back from a device call: on exit, every log and result under $OUT (the cache archive
# aside) goes into one $OUT/logs.tgz (FA3JAX_LOOSE_LOGS=1 keeps them loose).
pack_logs() {
  [ -n "${FA3JAX_LOOSE_LOGS:-}" ] && return
  (cd "$OUT" && ls -A | grep -vxE "device_cache.tgz|logs.tgz" >/tmp/fa3jax-logs.list && [ -s /tmp/fa3jax-logs.list ] &&
    tar czf /tmp/fa3jax-logs.tgz -T /tmp/fa3jax-logs.list && xargs -d '\n' rm -rf </tmp/fa3jax-logs.list &&
    mv /tmp/fa3jax-logs.tgz logs.tgz)
}
trap 'save_cache; pack_logs' EXIT
SUMMARY=()
stage() { local name=$1; shift; local t0=$SECONDS; "$@" >"$OUT/$name.log" 2>&1; local rc=$?;
          SUMMARY+=("$(printf '%-10s rc=%-3s %4ss  %s' "$name" "$rc" "$((SECONDS - t0))" "$(tail -n 1 "$OUT/$name.log" | cut -c1-90)")");
          return $rc; }

build() { buildext && buildtests; }
buildext() {
  export CUTLASS_INC=$(python3 -c "import cutlass_library,os;print(os.path.join(os.path.dirname(cutlass_library.__file__),'source','include'))")
  rm -rf /tmp/fa3site  # pip --target keeps an existing package: a warm machine would test the previous build
  FA3JAX_BUILD_CUDA=1 CMAKE_BUILD_PARALLEL_LEVEL=16 timeout ${BUILD_TIMEOUT:-400} python3 -m pip install --no-deps \
    --no-build-isolation --target /tmp/fa3site -q . || return 1
  # tests run from the source tree (python -m pytest puts it first on sys.path): put the extension there too
  cp /tmp/fa3site/fa3jax/backends/cuda/_fa3jax_cuda*.so fa3jax/backends/cuda/ || return 1
  echo "extension built: $(ls fa3jax/backends/cuda/_fa3jax_cuda*.so)"
}
buildtests() {
  cmake -S csrc -B build/csrc-tests -G Ninja -DFA3JAX_PTXAS_VERBOSE=ON -DFA3JAX_BUILD_TESTS=ON \
    -DFA3JAX_HEAD_DIMS="${FA3JAX_HEAD_DIMS:-64;128;256;192x128;128x64}" -DFA3JAX_DTYPES="${FA3JAX_DTYPES:-bf16;fp16}" >/dev/null \
    && cmake --build build/csrc-tests -j16 2>&1 | grep -E "error|spill|Used [0-9]+ registers" | sort | uniq | head -40
  # timeouts: a pipeline or barrier bug shows up as a hang, not a crash
  timeout 60 build/csrc-tests/fa3jax_test_layouts && timeout 180 build/csrc-tests/fa3jax_test_fwd &&
    timeout 120 build/csrc-tests/fa3jax_test_bwd && timeout 120 build/csrc-tests/fa3jax_test_varlen --quiet
}
cbench() { timeout 120 build/csrc-tests/fa3jax_test_fwd --bench --quiet | grep -E "^bench|passed"; }
# CTEST_BIN: the C++ test program to check (default: the one buildtests made; one built off the device works too)
# The Triton decode kernels (every schedule) under memcheck with hostile indices; the platform allocator gives each
# buffer its own allocation so that memcheck sees accesses past any of them.
sanitizetriton() {
  XLA_PYTHON_CLIENT_ALLOCATOR=platform timeout 400 compute-sanitizer --tool memcheck --error-exitcode 3 \
    python3 benchmarks/sanitize_decode.py
}
sanitize() {
  local bin=${CTEST_BIN:-build/csrc-tests/fa3jax_test_fwd}
  timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 "$bin" --quick --quiet &&
  timeout 200 compute-sanitizer --tool racecheck --error-exitcode 3 "$bin" --quick --quiet &&
  cuobjdump --dump-sass "$bin" | grep -oE "(HGMMA|HMMA)\.[0-9A-Za-z.x]+" | sort | uniq -c | head
}
gputest() {
  # xdist spreads Triton/XLA compilation over the 16 cores; no preallocation so 8 workers share the GPU.
  local site=""; [ -d /tmp/fa3site/fa3jax ] && site=/tmp/fa3site:
  PYTHONPATH=$site$PYTHONPATH XLA_PYTHON_CLIENT_PREALLOCATE=false timeout ${TEST_TIMEOUT:-420} \
    python3 -m pytest -q -n ${WORKERS:-8} ${PYTEST_ARGS:-} ${PYTEST_K:+-k "$PYTEST_K"} -m gpu -p no:cacheprovider -o addopts="" \
    ${TESTS:-tests/test_triton_gpu.py tests/test_triton_backend.py tests/test_cuda_backend.py} -rfE
}
bench() {
  local site=""; [ -d /tmp/fa3site/fa3jax ] && site=/tmp/fa3site:
  PYTHONPATH=$site$PYTHONPATH timeout ${BENCH_TIMEOUT:-500} python3 benchmarks/run.py --out "$OUT" ${BENCH_ARGS:-}
}
decode() {
  local site=""; [ -d /tmp/fa3site/fa3jax ] && site=/tmp/fa3site:
  PYTHONPATH=$site$PYTHONPATH python3 benchmarks/run.py --suite decode --out "$OUT" ${BENCH_ARGS:-}
}
varlen() {
  local site=""; [ -d /tmp/fa3site/fa3jax ] && site=/tmp/fa3site:
  PYTHONPATH=$site$PYTHONPATH python3 benchmarks/run.py --suite varlen --out "$OUT" ${VARLEN_ARGS:-}
}
prefill() {
  local site=""; [ -d /tmp/fa3site/fa3jax ] && site=/tmp/fa3site:
  PYTHONPATH=$site$PYTHONPATH python3 benchmarks/run.py --suite prefill --out "$OUT" ${PREFILL_ARGS:-}
}
# AB_VARIANTS="name=SRC[:POLICY] ...": SRC is a tree holding csrc/ ("." = this one, or an untracked `git archive`
# of another commit so that it travels), POLICY tile-policy overrides for csrc/generate_instantiations.py (e.g.
# d128.block_n=176,d128.tma_epilogue=0). Builds in parallel, checks each variant, then times them in AB_ROUNDS
# alternating rounds so that clock drift hits every variant alike.
ab() {
  local names=() name rest src policy
  for spec in ${AB_VARIANTS:-cur=.}; do
    name=${spec%%=*}; rest=${spec#*=}; src=${rest%%:*}; policy=""; [[ $rest == *:* ]] && policy=${rest#*:}
    names+=("$name")
    ( cmake -S "$src/csrc" -B "build/ab-$name" -G Ninja -DFA3JAX_HEAD_DIMS=128 -DFA3JAX_DTYPES=bf16 \
        -DFA3JAX_PTXAS_VERBOSE=ON "-DFA3JAX_POLICY=$policy" >/dev/null &&
      cmake --build "build/ab-$name" -j 8 >"$OUT/ab-$name-build.log" 2>&1 ) &
  done
  wait
  local bins=()
  for name in "${names[@]}"; do
    echo "== $name: $(grep -hoE "[0-9]+ bytes spill stores|Used [0-9]+ registers" "$OUT/ab-$name-build.log" | sort | uniq -c | tr '\n' ' ')"
    bins+=("$name=build/ab-$name/fa3jax_test_fwd")
  done
  tar czf "$OUT/ab_build_logs.tgz" -C "$OUT" $(cd "$OUT" && ls ab-*-build.log) && rm -f "$OUT"/ab-*-build.log
  AB_BINS="${bins[*]}" abbin
}
# AB_BINS="name=PATH ..." (AB_SKIP_CHECKS=1: timing only): prebuilt fa3jax_test_fwd programs (the C++ test links cudart statically and has no
# Python in it, so it can be compiled off the device and carried): each one's checks (the failing ones by name),
# then AB_ROUNDS alternating timing rounds (AB_ROUNDS=0: checks only). AB_CHECK_ARGS (default --quiet) and
# AB_BENCH_ARGS go to every program (fa3jax_test_bwd: AB_CHECK_ARGS= , AB_BENCH_ARGS=--deterministic).
abbin() {
  local spec name bin
  for spec in ${AB_BINS:-}; do
    [ -n "${AB_SKIP_CHECKS:-}" ] && break  # checked already (e.g. by cverify in an earlier call)
    name=${spec%%=*}; bin=${spec#*=}
    echo "== $name checks: $(timeout 120 "$bin" ${AB_CHECK_ARGS---quiet} | grep -E "^FAIL|passed" | tr '\n' ';')"
  done
  for r in $(seq ${AB_ROUNDS:-2}); do
    for spec in ${AB_BINS:-}; do
      name=${spec%%=*}; bin=${spec#*=}
      timeout 120 "$bin" --bench-only ${AB_BENCH_ARGS:-} | grep ^bench | sed "s/^bench/ab $name r$r/"
    done
  done
}
# CHECK_BINS="name=PATH[:ARGS] ...": prebuilt C++ test programs (carried, see abbin), each run for its checks and
# then under compute-sanitizer memcheck with --quick (memcheck output goes to $OUT/memcheck-NAME.log); the
# summary line per program says passed/failed and the sanitizer's error count.
cverify() {
  local spec name rest bin args rc=0
  for spec in ${CHECK_BINS:-}; do
    name=${spec%%=*}; rest=${spec#*=}; bin=${rest%%:*}; args=""; [[ $rest == *:* ]] && args=${rest#*:}
    local log st; log=$(timeout 180 "$bin" $args 2>&1); st=$?
    echo "== $name rc=$st: $(grep -E "^FAIL|passed" <<<"$log" | tr '\n' ';')"
    [ $st -eq 0 ] || rc=1
    timeout 200 compute-sanitizer --tool memcheck --error-exitcode 3 "$bin" --quick $args \
      >"$OUT/memcheck-$name.log" 2>&1
    echo "== $name memcheck rc=$? $(grep -E "ERROR SUMMARY" "$OUT/memcheck-$name.log" | tail -n 1)"
  done
  return $rc
}
# NCU_BIN (default: the build stage's test program), NCU_CASES="B,S,CAUSAL ..." (default 4,4096,1),
# NCU_VARIANT=dyn|static|wide, NCU_HEAD_DIM (128), NCU_DTYPE (bf16); profiles flash-attn3-jax's kernel on the same
# shapes too. Per-SASS-instruction counters go to CSV; everything comes back as one archive (at most 8 files come
# back from the device).
ncuprof() {
  local bin=${NCU_BIN:-build/csrc-tests/fa3jax_test_fwd} case b s causal rest tag
  local secs="--section SpeedOfLight --section WarpStateStats --section SourceCounters --section LaunchStats --section Occupancy"
  local site=""; [ -d /tmp/fa3site/fa3jax ] && site=/tmp/fa3site:
  for case in ${NCU_CASES:-4,4096,1}; do
    b=${case%%,*}; rest=${case#*,}; s=${rest%%,*}; causal=${rest#*,}; tag=b${b}_s${s}_c${causal}
    timeout 240 ncu $secs -k regex:fwd_kernel --launch-skip 3 -c 1 -f -o "$OUT/prof_ours_$tag" \
      "$bin" --bench-only --case "$case" --variant "${NCU_VARIANT:-dyn}" --head-dim "${NCU_HEAD_DIM:-128}" \
      --dtype "${NCU_DTYPE:-bf16}" | tail -n 2
    PYTHONPATH=$site$PYTHONPATH timeout 240 ncu $secs -k regex:device_kernel --launch-skip 1 -c 1 -f \
      -o "$OUT/prof_fa3_$tag" python3 benchmarks/profile_fwd.py --seqlen "$s" $([ "$causal" = 1 ] && echo --causal) \
      --impl flash-attn3-jax | tail -n 2
    for who in ours fa3; do
      ncu --import "$OUT/prof_${who}_$tag.ncu-rep" --page details >"$OUT/prof_${who}_${tag}_details.txt" 2>&1
      ncu --import "$OUT/prof_${who}_$tag.ncu-rep" --page source --csv --print-source sass \
        >"$OUT/prof_${who}_${tag}_sass.csv" 2>&1
      echo "$who $tag: $(grep -hE "^ +(Duration|Executed Instructions|Warp Cycles Per Issued Instruction|Compute \(SM\) Throughput) " \
        "$OUT/prof_${who}_${tag}_details.txt" | awk '{print $1, $(NF)}' | tr '\n' ' ')"
    done
  done
  tar czf "$OUT/prof.tgz" -C "$OUT" $(cd "$OUT" && ls prof_*) && rm -f "$OUT"/prof_*
}
# NCU_SEQLEN (default 16384), NCU_CAUSAL=1: Nsight Compute sections of the Triton forward and of
# flash-attn3-jax's kernel on the same shape (through benchmarks/profile_fwd.py), as text details pages.
ncutriton() {
  local secs="--section SpeedOfLight --section WarpStateStats --section ComputeWorkloadAnalysis --section Occupancy"
  local c=""; [ "${NCU_CAUSAL:-0}" = 1 ] && c=--causal
  for who in fa3jax:triton flash-attn3-jax; do
    local tag=${who#*:}
    timeout 200 ncu $secs -k regex:"_attn_fwd|device_kernel" -c 1 -f -o "$OUT/prof_$tag" \
      python3 benchmarks/profile_fwd.py --seqlen "${NCU_SEQLEN:-16384}" $c --impl "$who" | tail -n 2
    ncu --import "$OUT/prof_$tag.ncu-rep" --page details >"$OUT/prof_${tag}_details.txt" 2>&1
    echo "$tag: $(grep -hE "^ +(Duration|Executed Ipc Active|Compute \(SM\) Throughput|Registers Per Thread|Achieved Occupancy) " \
      "$OUT/prof_${tag}_details.txt" | awk '{print $1, $(NF)}' | tr '\n' ' ')"
  done
  rm -f "$OUT"/prof_*.ncu-rep
}
# SWEEP_ARGS: triton_sweep.py arguments; several sweeps separated by '|' run one after the other, each under
# SWEEP_TIMEOUT seconds.
# NCU_DECODE="layout,batch,cache,impl ..." (default: paged and contiguous b=64 32k for fa3jax:triton, paged for
# flash-attn3-jax:s1; impl names as in fa3jax.bench.decode_impls): Nsight Compute memory and stall sections of the
# decode kernels (benchmarks/profile_decode.py).
ncudecode() {
  local secs="--section SpeedOfLight --section MemoryWorkloadAnalysis --section WarpStateStats --section Occupancy"
  local spec layout b c impl rest tag
  for spec in ${NCU_DECODE:-paged,64,32768,fa3jax:triton contiguous,64,32768,fa3jax:triton paged,64,32768,flash-attn3-jax:s1}; do
    IFS=, read -r layout b c impl <<<"$spec"; tag=${layout}_b${b}_c${c}_${impl//:/-}
    timeout 200 ncu $secs -k regex:"_decode_fwd|device_kernel" -c 6 -f -o "$OUT/prof_$tag" \
      python3 benchmarks/profile_decode.py --layout "$layout" --batch "$b" --cache "$c" --impl "$impl" | tail -n 1
    ncu --import "$OUT/prof_$tag.ncu-rep" --page details >"$OUT/prof_${tag}_details.txt" 2>&1
    echo "$tag: $(grep -hE "^ +(Duration|DRAM Throughput|L2 Hit Rate|Warp Cycles Per Issued Instruction) " \
      "$OUT/prof_${tag}_details.txt" | awk '{print $1, $(NF)}' | tr '\n' ' ')"
  done
  rm -f "$OUT"/prof_*.ncu-rep
}
sweep() {
  local sets a; IFS='|' read -ra sets <<<"${SWEEP_ARGS:---kernel fwd --cands 128,128,8,3}"
  for a in "${sets[@]}"; do
    echo "== sweep:$a"
    timeout ${SWEEP_TIMEOUT:-300} python3 benchmarks/triton_sweep.py $a
  done
}

nvidia-smi --query-gpu=name,driver_version,clocks.sm,temperature.gpu --format=csv,noheader
for s in "$@"; do
  case $s in
    build) stage build build ;;
    buildext) stage buildext buildext ;;
    sanitize) stage sanitize sanitize ;;
    sanitizetriton) stage sanitizetriton sanitizetriton ;;
    cbench) stage cbench cbench ;;
    test) stage test gputest ;;
    bench) stage bench bench ;;
    decode) stage decode decode ;;
    varlen) stage varlen varlen ;;
    prefill) stage prefill prefill ;;
    sweep) stage sweep sweep ;;
    ab) stage ab ab ;;
    abbin) stage abbin abbin ;;
    cverify) stage cverify cverify ;;
    ncu) stage ncu ncuprof ;;
    ncutriton) stage ncutriton ncutriton ;;
    ncudecode) stage ncudecode ncudecode ;;
    *) echo "unknown stage $s"; exit 2 ;;
  esac
done
for s in "$@"; do [ -f "$OUT/$s.log" ] && { echo "=== $s (tail)"; tail -n 25 "$OUT/$s.log"; }; done
echo "=== summary"; printf '%s\n' "${SUMMARY[@]}"
