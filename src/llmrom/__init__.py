"""llmrom: training-free compression of Hugging Face causal LMs by reduced-order modelling (LLM-ROM)."""

__version__ = "0.1.0"

from .api import compress, load, save  # noqa: E402
from .config import CompressConfig  # noqa: E402
from .errors import LlmromError  # noqa: E402
from .modeling.io import load_model  # noqa: E402

__all__ = ["compress", "load", "save", "load_model", "CompressConfig", "LlmromError"]
