#!/usr/bin/env bash
# Issues 22 and 23's device check as one command, for a lent GPU machine (the `device` tool; its image has torch,
# transformers and pytest but not pydantic or transformer_lens). Here, once:
#   echo /.whl/ >> .git/info/exclude
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 --platform any -d .whl  <the packages this prints as missing, at the lock's pins>
# then run it there with `.whl` carried:  bash bench/gpu_session.sh
# Each part has its own time limit so one slow part leaves the others their turn; the logs come back from $OUT.
set -uo pipefail
OUT=${OUT:-/tmp/attnsae-gpu}
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD/src:$PWD/tests:${PYTHONPATH:-} PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import torch, transformers, transformer_lens, pydantic; print('torch', torch.__version__, 'transformers', transformers.__version__)" \
  || exit 1
# Parts in order of what is missing most; the whole stays under 560 s so one call (600 s at most) brings it all back.
for profile in gemma-2-2b pythia-70m; do  # issue 22: GPU hours from config.json alone (no weights, no hub)
  timeout 60 python3 -m attnsae plan --params profiles/$profile.yaml --device cuda 2>&1 | tee "$OUT/plan-$profile.log"
done
timeout 90 python3 -m pytest -q -p no:cacheprovider tests/test_gpu.py 2>&1 | tee "$OUT/gpu_tests.log" | tail -15
timeout 130 python3 bench/sparse_step.py --device cuda --repeats 10 2>&1 | tee "$OUT/sparse_step.log"
timeout 60 python3 bench/harvest.py --device cuda --rows 256 --repeats 5 2>&1 | tee "$OUT/harvest.log"
timeout 160 python3 bench/gpu.py 2>&1 | tee "$OUT/gpu.log"
