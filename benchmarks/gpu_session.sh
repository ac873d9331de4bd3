#!/usr/bin/env bash
# One call on the GPU machine: environment, CUDA tests, benchmarks. Results and logs go to $OUT.
#   STAGE=1: the Whisper benchmark (BENCH=0: skip it);  STAGE=2: CUDA tests with the real tiny.en, the natural-
#   decoding benchmark on real clips, the decode-step profile;  STAGE=ab: the decode-step A/B only.
# The real tiny.en weights (75 MB) exceed one call's upload, so they travel in two halves through the ignored
# .gpudata/ folder and are joined in .gpucache/ (kept on the warm machine between the two calls).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/out}
nvidia-smi --query-gpu=name,memory.total,clocks.sm,clocks.mem --format=csv
python3 -c "import pytest" 2>/dev/null || { python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site; }
python3 -c "import torch, triton, transformers; print('torch', torch.__version__, 'triton', triton.__version__, 'transformers', transformers.__version__)"
mkdir -p .gpucache
# fixtures of ../shared/reference (the checkout's sibling, absent on the GPU machine) travel in .gpudata/reference
[ -d .gpudata/reference ] && export TURBOFORMER_REFERENCE_DIR=$PWD/.gpudata/reference
KEEP=/root/turboformer-carry  # outside the working tree, which each call lays anew
mkdir -p $KEEP
if [ "${STAGE:-1}" = families ]; then
  # Conformer, Lite Transformer, SAM: their kernels' and engines' CUDA tests, then their benchmarks.
  # scikit-image is not on the GPU machine: a stand-in skimage.data serves the same photos (.gpudata/images.npz).
  export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD/.gpudata/skimage_stub
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/segment_anything*.whl 2>/dev/null; export PYTHONPATH=$PYTHONPATH:/tmp/site
  #   TESTS: pytest paths ("none": skip);  BENCHES: ";"-separated "family args..." runs of `turboformer bench`.
  #   PRE: a command run first (e.g. "python3 benchmarks/profile_engines.py --out $OUT").
  [ -z "${PRE:-}" ] || timeout ${PRE_TIMEOUT:-180} bash -c "$PRE" 2>&1 | tee "$OUT/pre.log" | tail -80
  TESTS=${TESTS:-tests/kernels tests/models/conformer tests/models/lite_transformer tests/models/sam tests/nn}
  [ "$TESTS" = none ] || timeout ${TEST_TIMEOUT:-420} python3 -m pytest -p no:cacheprovider -q -rs --maxfail=15 $TESTS -m cuda 2>&1 | tee "$OUT/pytest_families.log" | grep -v "^\.*$" | tail -60
  IFS=';' read -ra RUNS <<< "${BENCHES-conformer;lite-transformer;sam}"
  for spec in "${RUNS[@]}"; do
    [ -n "${spec// }" ] || continue
    name=$(echo $spec | tr -c 'a-z0-9-' '_' | cut -c1-60)
    timeout ${BENCH_TIMEOUT:-150} python3 -c "import sys; from turboformer.cli import main; sys.exit(main())" bench $spec --out "$OUT/results" 2>&1 | tee "$OUT/bench_$name.log" | grep -v "^\[" | tail -30
  done
elif [ "${STAGE:-1}" = ab ]; then
  python3 benchmarks/ab_decode_step.py 2>&1 | tee "$OUT/ab.log"
elif [ "${STAGE:-1}" = 1 ]; then
  cp .gpudata_a/tiny_a.bin $KEEP/ 2>/dev/null || cp .gpudata/tiny_a.bin $KEEP/
  [ "${BENCH:-1}" = 0 ] || python3 benchmarks/bench_whisper.py --models ${MODELS:-tiny base small large-v3 large-v3-turbo} --int8 --out "$OUT/results" --name ${NAME:-whisper} 2>&1 | tee "$OUT/bench1.log"
else
  mkdir -p .gpucache/tiny.en
  cat $KEEP/tiny_a.bin $(ls .gpudata_b/tiny_b.bin .gpudata/tiny_b.bin 2>/dev/null | head -1) > .gpucache/tiny.en/model.bin
  cp .gpudata/config.json .gpudata/tokenizer.json .gpudata/vocabulary.txt .gpucache/tiny.en/
  export TURBOFORMER_SPEECH_DIR=$PWD/.gpudata/speech TURBOFORMER_TINY_EN_DIR=$PWD/.gpucache/tiny.en
  #   TESTS: pytest paths ("none": skip); MARK: e.g. "cuda" (only the GPU tests); NATURAL: bench_whisper_natural args
  [ "${TESTS:-}" = none ] || timeout ${TEST_TIMEOUT:-400} python3 -m pytest -p no:cacheprovider -q -rs -s ${TESTS:-tests/models/whisper/test_graph_engine.py tests/kernels} ${MARK:+-m $MARK} 2>&1 | tee "$OUT/pytest_gpu.log" | grep -v "^\.*$" | tail -30
  timeout ${BENCH_TIMEOUT:-300} python3 benchmarks/bench_whisper_natural.py --model .gpucache/tiny.en --speech .gpudata/speech --out "$OUT/results" ${NATURAL:-} 2>&1 | grep -v "^\[transformers\]" | tail -40
  [ "${PROFILE:-1}" = 0 ] || python3 benchmarks/profile_decode_step.py --model large-v3 --batch 1 > "$OUT/profile.log" 2>&1
fi
