"""Freeze the running CPython's pydoc topics as llmrom's `pydoc` calibration text.

    python scripts/freeze_pydoc_topics.py

`pydoc_data.topics` changes between Python releases (3.11.2's and 3.11.7's differ by 1,049
characters), so calibrating on the running Python's copy made the same command give other numbers
on another Python. llmrom ships one frozen copy instead, src/llmrom/data/pydoc_topics_<version>.txt.xz
(the topics joined with blank lines in sorted key order, as llmrom has always joined them); the
running Python's copy stays available as `--calib pydoc:running`. The text is CPython's
documentation, Copyright Python Software Foundation, redistributed under the PSF License Agreement
(src/llmrom/data/NOTICE). Re-freezing changes the default calibration, and so every benchmark
row's calibration fingerprint: do it only with a new benchmark run.
"""

import lzma
import platform
from pathlib import Path

from llmrom.data.textdata import load_text

DATA = Path(__file__).resolve().parent.parent / "src" / "llmrom" / "data"


def main():
    text = load_text("pydoc:running")  # the running Python's topics, joined as llmrom joins them
    out = DATA / f"pydoc_topics_{platform.python_version()}.txt.xz"
    out.write_bytes(lzma.compress(text.encode("utf-8"), preset=9 | lzma.PRESET_EXTREME))
    print(f"{out}: {len(text):,} characters, {out.stat().st_size:,} bytes")


if __name__ == "__main__":
    main()
