"""A GGUF file read tensor by tensor, behind the interface of stream.py's `Checkpoint`.

`llmrom compress MODEL.gguf --stream` never dequantizes the whole model: each tensor is read from
the file and dequantized when the module that owns it runs or is compressed, then released with
it. The values are those of transformers' own GGUF loader (`from_pretrained(..., gguf_file=...)`,
which dequantizes every tensor up front), because the same functions produce them, called one
tensor at a time:

- the GGUF -> Hugging Face names come from `get_gguf_hf_weights_map` on the meta skeleton;
- each tensor goes through `gguf.dequantize`, then the architecture's `TensorProcessor` (llama's
  reverse permutation of q/k, gemma's norm `w - 1`), then the cast to the requested dtype.

The table of tensors comes from the `gguf` package's `GGUFReader` (memory-mapped, only the header
is parsed); the bytes of one tensor are read with an ordinary positioned read, so pages of the
file do not stay mapped into the process once the tensor is dequantized.

Only architectures whose transformers processing maps each GGUF tensor to one parameter by itself
are streamed (`STREAMABLE`); the others (experts merged from several tensors, fused heads, new
loader paths) are refused with the non-streaming alternative.
"""

from math import prod
from pathlib import Path

import numpy as np
import torch

from ..errors import LlmromError

# GGUF `general.architecture` values streamed; llama, qwen2 and gemma3 are checked against transformers'
# loader on real files (tests/test_gguf_stream.py); qwen3 and gemma2 use the same one-to-one processing.
STREAMABLE = ("llama", "qwen2", "qwen3", "gemma2", "gemma3")


def _field(reader, key):
    field = reader.fields.get(key)
    return None if field is None else field.contents()


class GgufCheckpoint:
    """The tensors of one .gguf file, dequantized on demand; `bind(skeleton)` before `read`."""

    config_source = "its GGUF metadata"

    def __init__(self, path):
        try:
            from gguf import GGUFReader
        except ImportError:
            raise LlmromError("reading GGUF files needs the gguf package: pip install gguf") from None
        self.folder = self.path = Path(path)
        try:
            reader = GGUFReader(self.path)
        except (ValueError, OSError) as e:
            raise LlmromError(f"{path} is not a readable GGUF file: {str(e).splitlines()[0]}") from None
        self.architecture = _field(reader, "general.architecture")
        if self.architecture not in STREAMABLE:
            raise LlmromError(f"{path}: --stream does not read GGUF architecture {self.architecture!r} tensor by "
                              f"tensor (it does {', '.join(STREAMABLE)}); drop --stream to load it whole")
        # (ggml type, absolute offset, numpy dtype and shape of the stored data) per GGUF name; the
        # mapped arrays themselves are dropped with the reader
        self.tensors = {t.name: (t.tensor_type, t.data_offset, t.data.dtype, tuple(t.data.shape))
                        for t in reader.tensors}
        del reader
        self.files = {}  # Hugging Face name -> GGUF name, filled by bind()
        self._processor = self._mapping = None

    def bind(self, model):
        """Name the file's tensors after the parameters of `model`, the skeleton built from this file."""
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map)
        self._processor = TENSOR_PROCESSORS.get(self.architecture, TensorProcessor)(config=model.config.to_dict())
        try:
            self._mapping = get_gguf_hf_weights_map(model, self._processor)
        except (NotImplementedError, ValueError) as e:
            raise LlmromError(f"{self.path}: cannot name its tensors after the model's parameters "
                              f"({str(e).splitlines()[0]}); drop --stream to load it whole") from None
        self.files = {hf: name for name, hf in self._mapping.items() if name in self.tensors}
        return self

    def __contains__(self, name):
        return name in self.files

    def read(self, dtypes):
        """{name: tensor} for {name: dtype}: each tensor read, dequantized and processed as transformers does."""
        from gguf import dequantize
        out = {}
        with open(self.path, "rb") as f:
            for name, dtype in dtypes.items():
                gguf_name = self.files[name]
                qtype, offset, stored, shape = self.tensors[gguf_name]
                f.seek(offset)
                data = np.fromfile(f, dtype=stored, count=prod(shape)).reshape(shape)
                sink = {"tensors": {}}
                result = self._processor.process(weights=dequantize(data, qtype), name=gguf_name,
                                                 tensor_key_mapping=self._mapping, parsed_parameters=sink)
                if result.name != gguf_name or sink["tensors"]:
                    raise LlmromError(f"{self.path}: transformers combines {gguf_name} with other tensors when "
                                      "loading it, so it cannot be streamed; drop --stream to load the file whole")
                t = torch.from_numpy(np.copy(result.weights))
                out[name] = t.to(dtype) if t.is_floating_point() else t
                del data, result
        return out
