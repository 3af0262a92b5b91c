"""Cost of a model: unique parameters, MACs per token, peak resident memory of this process."""

import resource

from .arch import is_linear


def count_params(model):
    """Unique parameters (tied embeddings counted once)."""
    return sum(p.numel() for p in model.parameters())


def linear_macs_per_token(model):
    """Multiply-accumulates of every linear layer (factorized ones count both factors) for one token."""
    return sum(m.weight.numel() for m in model.modules() if is_linear(m))


def attention_macs_per_token(model, seqlen=128):
    """Score and mixing MACs (q.k and attn.v) of one token averaged over a causal window of `seqlen`."""
    cfg = model.config
    get = getattr(cfg, "get_text_config", lambda: cfg)()
    layers = getattr(get, "num_hidden_layers", 0)
    heads = getattr(get, "num_attention_heads", 0)
    head_dim = getattr(get, "head_dim", None) or getattr(get, "hidden_size", 0) // max(heads, 1)
    return int(layers * 2 * heads * head_dim * (seqlen + 1) / 2)


def macs_per_token(model, seqlen=128):
    return linear_macs_per_token(model) + attention_macs_per_token(model, seqlen)


def peak_rss_bytes():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
