"""Text sources -> token windows for calibration and perplexity evaluation.

``load_text(source)`` returns one string, documents joined with blank lines. Sources:
``pydoc`` (built in: CPython 3.11.7's pydoc topics, frozen in llmrom/data so the text is the same on
every Python; ``pydoc:running`` is the running Python's own copy), ``python-docs[:SUBDIR]`` (Debian
``python3.11-doc``), a local file or folder, and ``wikitext2`` / ``ptb`` / ``c4`` through the optional
``datasets`` package (``NAME:SPLIT``).

BOS: a tokenizer that adds a BOS token by itself (LLaMA, Gemma, OPT; not GPT-2 or SmolLM2) gets
BOS at the start of every calibration window, followed by ``seqlen - 1`` text tokens, so the
statistics see what the model sees at inference. Evaluation follows the GPTQ perplexity protocol:
the whole text is tokenized once (one leading BOS if the tokenizer adds one) and cut into windows.
"""

from __future__ import annotations

import hashlib
import json
import lzma
import os
from pathlib import Path

import torch

from ..errors import LlmromError

PYDOC_FROZEN = Path(__file__).parent / "pydoc_topics_3.11.7.txt.xz"  # scripts/freeze_pydoc_topics.py
PYDOCS_DIR = "/usr/share/doc/python3.11/html/_sources"  # Debian python3.11-doc (*.rst.txt)
TEXT_SUFFIXES = (".txt", ".md", ".rst")
# name -> (load_dataset args, text field, default split, allowed splits)
HUB_SOURCES = {
    "wikitext2": (("wikitext", "wikitext-2-raw-v1"), "text", "train", ("train", "validation", "test")),
    "ptb": (("ptb_text_only", "penn_treebank"), "sentence", "train", ("train", "validation", "test")),
    "c4": (("allenai/c4",), "text", "train", ("train", "validation")),
}
# The GPTQ / SVD-LLM c4 shards; only the first documents are kept (GPTQ evaluates on 1100).
C4_SHARDS = {"train": "en/c4-train.00000-of-01024.json.gz",
             "validation": "en/c4-validation.00000-of-00008.json.gz"}
C4_MAX_DOCS = {"train": 5000, "validation": 1100}
KNOWN = ("pydoc, pydoc:running, tasks (the paper's six zero-shot tasks, offline), python-docs[:SUBDIR], "
         "wikitext2[:SPLIT], ptb[:SPLIT], c4[:SPLIT], or a path to a file or folder")


def load_text(source: str = "pydoc") -> str:
    """The text of a named source or local path, documents joined with blank lines."""
    if not isinstance(source, str) or not source.strip():
        raise LlmromError(f"text source must be a non-empty string, got {source!r}; use one of {KNOWN}")
    name, _, arg = source.partition(":")
    if source == "pydoc":  # named sources win; write ./pydoc for a local file of that name
        return lzma.decompress(PYDOC_FROZEN.read_bytes()).decode("utf-8")
    if source == "tasks":  # the paper's six tasks' calibration documents, joined (windows: calib_windows)
        from .tasks import PAPER_SIX, calibration_text
        return "\n\n".join(calibration_text(task) for task in PAPER_SIX)
    if source == "pydoc:running":
        from pydoc_data.topics import topics
        return "\n\n".join(topics[k] for k in sorted(topics))
    if name == "python-docs":
        return _load_pydocs(arg)
    if name in HUB_SOURCES:
        return _load_hub(name, arg)
    if os.path.exists(source):
        return _load_path(Path(source))
    if os.sep in source or "/" in source or Path(source).suffix:
        raise LlmromError(f"text file or folder not found: {source}; check the path")
    raise LlmromError(f"unknown text source {source!r}; use one of {KNOWN}")


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise LlmromError(f"{path} is not UTF-8 text ({e.reason}); convert it to UTF-8") from None


def _join(docs: list[str], where: str) -> str:
    docs = [d for d in docs if d.strip()]
    if not docs:
        raise LlmromError(f"{where} holds no text; point the source at a file or folder with text in it")
    return "\n\n".join(docs)


def _text_files(folder: Path, suffixes: tuple[str, ...]) -> list[Path]:
    files = [p for p in folder.rglob("*") if p.is_file() and p.name.endswith(suffixes)]
    return sorted(files, key=lambda p: p.relative_to(folder).as_posix())


def _load_path(path: Path) -> str:
    if path.is_dir():
        files = _text_files(path, TEXT_SUFFIXES)
        if not files:
            raise LlmromError(f"folder {path} has no {'/'.join(TEXT_SUFFIXES)} files; add some or name a file")
        return _join([_read(f) for f in files], f"folder {path}")
    if path.suffix.lower() == ".jsonl":
        return _join(_jsonl_docs(path), f"file {path}")
    return _join([_read(path)], f"file {path}")


def _jsonl_docs(path: Path) -> list[str]:
    docs = []
    for n, line in enumerate(_read(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise LlmromError(f"{path} line {n} is not valid JSON ({e.msg}); write one JSON object per line") from None
        strings = [k for k, v in obj.items() if isinstance(v, str)] if isinstance(obj, dict) else []
        if isinstance(obj, dict) and isinstance(obj.get("text"), str):
            docs.append(obj["text"])
        elif len(strings) == 1:
            docs.append(obj[strings[0]])
        else:
            raise LlmromError(f"{path} line {n} has no 'text' field and not exactly one string field; "
                              "give each line a 'text' string field")
    return docs


def _load_pydocs(subdir: str) -> str:
    base = Path(os.environ.get("LLMROM_PYDOCS_DIR", PYDOCS_DIR))
    if not base.is_dir():
        raise LlmromError(f"Python docs not found at {base}; run `apt-get install python3.11-doc` "
                          "or set LLMROM_PYDOCS_DIR to the docs' _sources folder")
    folder = (base / subdir) if subdir else base
    if ".." in Path(subdir).parts or not folder.is_dir():
        have = ", ".join(sorted(p.name for p in base.iterdir() if p.is_dir()))
        raise LlmromError(f"no folder {subdir!r} in {base}; use python-docs:NAME with NAME one of: {have}")
    files = _text_files(folder, (".txt",))
    if not files:
        raise LlmromError(f"no .txt files under {folder}; reinstall python3.11-doc or pick another folder")
    return _join([_read(f) for f in files], f"folder {folder}")


def _load_hub(name: str, split: str) -> str:
    args, field, default, splits = HUB_SOURCES[name]
    split = split or default
    if split not in splits:
        raise LlmromError(f"{name} has no split {split!r}; use {name}:" + f" or {name}:".join(splits))
    try:
        import datasets
    except ImportError:
        raise LlmromError(f"source {name!r} needs the datasets package; run `pip install datasets` "
                          "or use a local text file") from None
    kwargs = {"data_files": {split: C4_SHARDS[split]}} if name == "c4" else {}
    try:
        ds = datasets.load_dataset(*args, split=split, **kwargs)
        if name == "c4":
            ds = ds.select(range(min(C4_MAX_DOCS[split], len(ds))))
        docs = ds[field]
    except Exception as e:  # network, hub, cache or format trouble: all mean "not available here"
        raise LlmromError(f"dataset {name}:{split} could not be fetched ({type(e).__name__}: "
                          f"{str(e).splitlines()[0] if str(e) else ''}); use a local file instead") from e
    return _join(list(docs), f"dataset {name}:{split}")


def adds_bos(tokenizer) -> bool:
    """Whether the tokenizer puts a BOS token in front of a text by itself."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    if getattr(tokenizer, "add_bos_token", False) is True:
        return True
    with_special = tokenizer("a")["input_ids"]
    return with_special[:1] == [bos] and tokenizer("a", add_special_tokens=False)["input_ids"][:1] != [bos]


def _tokenize(tokenizer, text: str) -> torch.Tensor:
    """All tokens of the text, no special tokens; verbose=False silences the max-length warning."""
    if not isinstance(text, str) or not text:
        raise LlmromError("text to tokenize is empty; load a text source with load_text() first")
    ids = tokenizer(text, add_special_tokens=False, verbose=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def _check_positive(**values) -> None:
    for name, v in values.items():
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise LlmromError(f"{name} must be a positive integer, got {v!r}; pass e.g. {name}=128")


def tokens_sha256(tokens: torch.Tensor) -> str:
    """SHA-256 of a token-id tensor: one fingerprint of text, tokenizer and window positions together.

    Reports carry it because the same named source is not the same text everywhere: ``pydoc:running``
    and ``python-docs`` are the machine's own copies, which change between releases (3.11.2's and
    3.11.7's pydoc topics differ by 1,049 characters, enough to change which blocks a budget
    compresses; hence the frozen ``pydoc``), and a local file is whatever it holds."""
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def calibration_windows(tokenizer, text: str, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """nsamples windows of seqlen tokens at random offsets (torch.Generator seeded by seed).

    Windows may overlap when the text is short. With a BOS-adding tokenizer each window is BOS plus
    seqlen - 1 text tokens.
    """
    _check_positive(nsamples=nsamples, seqlen=seqlen)
    bos = adds_bos(tokenizer)
    if bos and seqlen < 2:
        raise LlmromError("seqlen must be at least 2 for a tokenizer that adds BOS; raise seqlen")
    ids = _tokenize(tokenizer, text)
    span = seqlen - 1 if bos else seqlen
    if len(ids) < span:
        raise LlmromError(f"text has only {len(ids)} tokens, too few for one window of seqlen={seqlen}; "
                          f"use seqlen <= {len(ids) + bos} or a longer text")
    gen = torch.Generator().manual_seed(int(seed))
    starts = torch.randint(0, len(ids) - span + 1, (nsamples,), generator=gen)
    windows = ids[starts[:, None] + torch.arange(span)]
    if bos:
        windows = torch.cat([torch.full((nsamples, 1), tokenizer.bos_token_id, dtype=torch.long), windows], 1)
    return windows


def calib_windows(tokenizer, source: str, nsamples: int, seqlen: int, seed: int) -> torch.LongTensor:
    """The calibration windows of a --calib source: windows of its text, or for `tasks` (the paper's
    source) an equal share of the windows from each of the six zero-shot tasks' calibration documents
    (llmrom.data.tasks; never the documents that are scored)."""
    if source != "tasks":
        return calibration_windows(tokenizer, load_text(source), nsamples, seqlen, seed)
    from .tasks import PAPER_SIX, calibration_text
    _check_positive(nsamples=nsamples)
    share = [nsamples // len(PAPER_SIX) + (k < nsamples % len(PAPER_SIX)) for k in range(len(PAPER_SIX))]
    parts = [calibration_windows(tokenizer, calibration_text(task), n, seqlen, seed + k)
             for k, (task, n) in enumerate(zip(PAPER_SIX, share)) if n]
    return torch.cat(parts)


def eval_windows(tokenizer, text: str, seqlen: int, max_windows: int | None = None) -> torch.LongTensor:
    """Consecutive non-overlapping windows of seqlen tokens (the perplexity protocol), tail dropped."""
    _check_positive(seqlen=seqlen)
    if max_windows is not None:
        _check_positive(max_windows=max_windows)
    ids = _tokenize(tokenizer, text)
    if adds_bos(tokenizer):
        ids = torch.cat([torch.tensor([tokenizer.bos_token_id]), ids])
    n = len(ids) // seqlen
    if n == 0:
        raise LlmromError(f"text has only {len(ids)} tokens, fewer than one window of seqlen={seqlen}; "
                          f"use seqlen <= {len(ids)} or a longer text")
    if max_windows is not None:
        n = min(n, max_windows)
    return ids[: n * seqlen].view(n, seqlen)
