#!/usr/bin/env bash
# Set up (if needed), compress the real SmolLM2-135M to 90% of its parameters on the built-in calibration
# text, then show before and after side by side: parameters, bytes on disk, held-out perplexity, speed,
# and both models' greedy continuation of one fixed prompt.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
out=${OUT:-out/smollm2-135m-b0.9}
# 128 calibration windows (the benchmark's protocol) keep set-up plus demo within minutes on 2 cores;
# the library default is 512
llmrom --log-level WARNING compress smollm2-135m --budget 0.9 --calib pydoc --nsamples 128 --out "$out" --overwrite "$@"
echo
llmrom info "$out" | head -n 12
echo "... (llmrom info $out shows every module)"
echo
# the compressed folder against the dense original, measured side by side in one process
llmrom --log-level WARNING eval "$out" --windows 16 --generate "The Python programming language is"
