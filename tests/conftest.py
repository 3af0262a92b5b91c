"""Tiny in-process models of several families (hidden 64, 2 layers, GQA where the family has it)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
import transformers  # noqa: E402

COMMON = dict(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)

TINY_CONFIGS = {
    "llama": lambda: transformers.LlamaConfig(**COMMON, tie_word_embeddings=True),
    "mistral": lambda: transformers.MistralConfig(**COMMON, sliding_window=8),
    "qwen2": lambda: transformers.Qwen2Config(**COMMON, tie_word_embeddings=False),
    "gemma3": lambda: transformers.Gemma3TextConfig(**COMMON, head_dim=16, sliding_window=8,
                                                    layer_types=["sliding_attention", "full_attention"]),
    "gpt2": lambda: transformers.GPT2Config(vocab_size=128, n_embd=64, n_layer=2, n_head=4, n_positions=256),
}


def tiny_model(family, seed=0):
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(TINY_CONFIGS[family](), dtype=torch.float32)
    with torch.no_grad():  # random init has tiny norms/zero biases; perturb so every term matters
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(0.1 * torch.randn_like(p))
    return model.eval()


class TinyTokenizer:
    """Enough of a tokenizer for calibration_windows/save: characters -> ids modulo the vocab."""

    bos_token_id = None
    add_bos_token = False

    def __call__(self, text, add_special_tokens=False, **kw):
        return {"input_ids": [ord(c) % 128 for c in text]}

    def encode(self, text, add_special_tokens=False, **kw):
        return self(text)["input_ids"]

    def save_pretrained(self, folder):
        return ()


@pytest.fixture(params=sorted(TINY_CONFIGS))
def family(request):
    return request.param


def calib_tokens(n=12, seqlen=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 128, (n, seqlen), generator=g)


def trained_tokenizer(vocab_size=128):
    """A real fast BPE tokenizer trained in-process on the built-in pydoc text (no download)."""
    from pydoc_data.topics import topics
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<unk>", "<s>"], show_progress=False)
    tok.train_from_iterator(list(topics.values())[:50], trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    """A tiny llama saved as an ordinary Hugging Face folder, with a tokenizer."""
    folder = tmp_path_factory.mktemp("tiny") / "llama"
    tiny_model("llama").save_pretrained(folder)
    trained_tokenizer().save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def no_device_speed_limits(request, monkeypatch):
    """Plans in tests do not depend on how fast this machine runs the factor forms (--prefer speed
    measures that): every linear may be factorized, as with --prefer quality. Tests marked
    `measured_latency` see the real measurement (and keep its cache out of $HOME themselves)."""
    if request.node.get_closest_marker("measured_latency") is None:
        monkeypatch.setattr("llmrom.plan.choose.speed_limits", lambda shapes, prefer, *a, **k: {})


def pytest_configure(config):
    config.addinivalue_line("markers", "measured_latency: the plan sees this machine's measured factor latencies")
