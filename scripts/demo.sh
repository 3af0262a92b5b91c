#!/usr/bin/env bash
# Set up (if needed), compress the real SmolLM2-135M at 90% of its parameters on the built-in
# calibration text, and print parameters and held-out perplexity before and after.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${OUT:-out/smollm2-135m-b0.9}
llmrom --log-level WARNING compress smollm2-135m --budget 0.9 --calib pydoc \
  --eval python-docs:tutorial --out "$out" --overwrite "$@"
echo
llmrom info "$out" | head -n 12
echo "... (llmrom info $out shows every module)"
echo
# fidelity to the dense model and measured speed, side by side in one run
llmrom --log-level WARNING eval "$out" --windows 16
