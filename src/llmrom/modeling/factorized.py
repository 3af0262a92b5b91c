"""The factorized linear layer and the class factory that puts it into a Hugging Face model.

This file is deliberately self-contained (it imports only torch): `llmrom.save` copies its source
into every saved folder as the `trust_remote_code` modeling file, so a compressed model loads with
plain `AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)` where llmrom is not
installed. Keep it free of llmrom imports.

Metadata lives in `config.llmrom`:
    {"format_version": 1, "method": "rom", "base_architecture": "LlamaForCausalLM",
     "modules": {"model.layers.29.mlp.down_proj": {"rank": 123, "bias": false}, ...}}
A module with a sparse residual (low-rank plus sparse) also has "nnz": its number of stored
nonzeros; a folder with any such module is written as format_version 2, so that llmrom versions
which do not know the sparse part refuse it instead of loading the factors without it.
A factorized token embedding adds
    "embedding": {"name": "model.embed_tokens", "rank": 384, "head": "lm_head" or null}
("head": the output layer tied to it, factorized with it); such a folder is format_version 3.
A module stored in the interpolative form (llmrom.interp) has "interp": "in" or "out" (the side
whose identity is not stored); a folder with any such module is format_version 4.
Linears that read the same input and were factorized through one shared basis (JointFactorizedLinear)
are listed under
    "joint": {"model.layers.3.self_attn.q_proj": {"members": ["...q_proj", "...k_proj", "...v_proj"],
              "sizes": [576, 192, 192], "rank": 380, "bias": true, "interp": "in"}, ...}
keyed by the first member, which holds the stacked map's factors ("interp" as for a module, absent for
a pair); such a folder is format_version 5.
"""

import warnings

import torch
from torch import nn
from torch.nn import functional as F

FORMAT_VERSION = 1  # low-rank factors only
SPARSE_FORMAT_VERSION = 2  # some modules add a sparse residual ("nnz" in their metadata)
EMBEDDING_FORMAT_VERSION = 3  # the token embedding (and its tied head) are factorized ("embedding")
INTERP_FORMAT_VERSION = 4  # some modules store their factors in the interpolative form ("interp")
JOINT_FORMAT_VERSION = 5  # some linears that share an input share one basis ("joint")
READABLE_VERSIONS = (FORMAT_VERSION, SPARSE_FORMAT_VERSION, EMBEDDING_FORMAT_VERSION, INTERP_FORMAT_VERSION,
                     JOINT_FORMAT_VERSION)


def csr_rows(crow, nnz):
    """Row index (int64) of each of the `nnz` nonzeros of a CSR matrix with row pointers `crow`."""
    counts = (crow[1:] - crow[:-1]).long()
    return torch.repeat_interleave(torch.arange(crow.numel() - 1, device=crow.device), counts, output_size=nnz)


def csr_dense(crow, col, values, d_in, like):
    """The CSR matrix as a dense (rows x d_in) tensor of `like`'s dtype and device."""
    s = like.new_zeros(crow.numel() - 1, d_in)
    return s.index_put((csr_rows(crow, col.numel()), col.long()), values.to(s.dtype))


class FactorizedLinear(nn.Module):
    """y = second(first(x)) [+ S x]: `first` (rank x in) is V_r^T W, `second` (out x rank) is V_r.

    `second` carries the bias: the original bias plus, for centred PCA, the restored mean.
    In the interpolative form (llmrom.interp) rank rows or columns of the factors are the identity
    and not stored; `order` (int32) holds the indices of that side:
      interp "in":  z = x[K] + first(x[O]), y = second(z); `first` (rank x (in - rank)) is D and
                    `order` = [K, O] (in);
      interp "out": z = first(x), y = [z, second(z)][order] + out_bias; `second` holds the
                    (out - rank) rows C and `order` (out) the place of each output in [z, C z].
    With `nnz` > 0 the module also holds a sparse residual S (out x in) in CSR form: `sparse_values`
    (nnz, a parameter in the model's dtype), `sparse_col` (nnz column indices, int32) and
    `sparse_crow` (out + 1 row pointers, int32); nonzeros are ordered by row, then column.
    """

    def __init__(self, in_features, out_features, rank, bias, dtype=None, device=None, nnz=0, interp=None):
        super().__init__()
        self.in_features, self.out_features, self.rank, self.nnz = in_features, out_features, rank, nnz
        if interp not in (None, "in", "out"):
            raise ValueError(f"interp must be None, 'in' or 'out', got {interp!r}")
        self.interp = interp
        first_in = in_features - rank if interp == "in" else in_features
        second_out = out_features - rank if interp == "out" else out_features
        self.first = nn.Linear(first_in, rank, bias=False, dtype=dtype, device=device)
        self.second = nn.Linear(rank, second_out, bias=bias and interp != "out", dtype=dtype, device=device)
        self.register_parameter("out_bias", nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device))
                                if interp == "out" and bias else None)
        if interp:
            side = in_features if interp == "in" else out_features
            self.register_buffer("order", torch.arange(side, dtype=torch.int32, device=device))
        if nnz:
            self.sparse_values = nn.Parameter(torch.zeros(nnz, dtype=dtype, device=device))
            self.register_buffer("sparse_col", torch.zeros(nnz, dtype=torch.int32, device=device))
            self.register_buffer("sparse_crow", torch.zeros(out_features + 1, dtype=torch.int32, device=device))

    def _plain(self, layer):
        """The weight and bias of `layer` when it is a plain nn.Linear (its weight may be a quantized tensor
        subclass: F.linear dispatches it), else None: an adapter wrapped around it must be called."""
        return (layer.weight, layer.bias) if type(layer) is nn.Linear else None

    def forward(self, x):
        # One functional call per product, no submodule calls: at batch 1 (decoding) a module call costs as
        # much as a small product, and every factorized linear runs two or three of them.
        first, second = self._plain(self.first), self._plain(self.second)
        if first is None or second is None:
            y = self._forward_modules(x)
        elif self.interp == "in":  # one gather puts x in [K, O] order; z = x[K] + D x[O] in one addmm
            xp = x.index_select(-1, self.order).reshape(-1, self.in_features)
            if type(first[0]) is nn.Parameter:
                z = torch.addmm(xp[:, :self.rank], xp[:, self.rank:], first[0].T)
            else:  # a quantized weight: F.linear is the product its subclass implements
                z = xp[:, :self.rank] + F.linear(xp[:, self.rank:], first[0])
            y = F.linear(z, *second).reshape(*x.shape[:-1], self.out_features)
        elif self.interp == "out":
            z = F.linear(x, first[0])
            y = torch.cat([z, F.linear(z, second[0])], -1).index_select(-1, self.order)
            y = y if self.out_bias is None else y + self.out_bias
        else:
            y = F.linear(F.linear(x, first[0]), *second)
        return y + self.sparse_forward(x) if self.nnz else y

    def _forward_modules(self, x):
        """The same map through the factor modules, for factors wrapped by adapters (llmrom heal's LoRA)."""
        if self.interp == "in":
            z = x.index_select(-1, self.order[:self.rank]) + self.first(x.index_select(-1, self.order[self.rank:]))
            return self.second(z)
        if self.interp == "out":
            z = self.first(x)
            y = torch.cat([z, self.second(z)], -1).index_select(-1, self.order)
            return y if self.out_bias is None else y + self.out_bias
        return self.second(self.first(x))

    def factor_matrices(self):
        """(second, first) as the plain (out x rank) and (rank x in) factors, identity put back."""
        first, second = self.first.weight, self.second.weight
        if self.interp:
            eye = torch.eye(self.rank, dtype=first.dtype, device=first.device)
            place = torch.empty_like(self.order, dtype=torch.long)
            if self.interp == "in":  # columns [K, O] of [I, D] go to positions order
                place[self.order.long()] = torch.arange(self.in_features, device=first.device)
                first = torch.cat([eye, first], 1).index_select(1, place)
            else:
                second = torch.cat([eye, second]).index_select(0, self.order)
        return second, first

    def sparse_forward(self, x, chunk_elements=1 << 24):
        """S x: a CSR sparse-dense product for float32/float64 (torch's CSR kernels), otherwise (e.g.
        bfloat16 on CPU, which those kernels lack) plain gather / index_add over chunks of tokens, the
        (tokens x nnz) products kept below `chunk_elements`. Both are differentiable in the values."""
        flat = x.reshape(-1, self.in_features)
        if self.sparse_values.dtype in (torch.float32, torch.float64) and flat.dtype == self.sparse_values.dtype:
            with warnings.catch_warnings():  # torch's "Sparse CSR tensor support is in beta", here only
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
                s = torch.sparse_csr_tensor(self.sparse_crow, self.sparse_col, self.sparse_values,
                                            (self.out_features, self.in_features), check_invariants=False)
            return (s @ flat.T).T.reshape(*x.shape[:-1], self.out_features)
        rows, cols = csr_rows(self.sparse_crow, self.nnz), self.sparse_col.long()
        step = max(1, chunk_elements // self.nnz)
        outs = []
        for i in range(0, max(flat.shape[0], 1), step):
            part = flat[i:i + step].index_select(1, cols) * self.sparse_values
            outs.append(part.new_zeros(part.shape[0], self.out_features).index_add_(1, rows, part))
        out = outs[0] if len(outs) == 1 else torch.cat(outs)
        return out.reshape(*x.shape[:-1], self.out_features)

    def sparse_dense(self):
        """The sparse residual as a dense (out x in) matrix."""
        if not self.nnz:
            return self.first.weight.new_zeros(self.out_features, self.in_features)
        return csr_dense(self.sparse_crow, self.sparse_col, self.sparse_values, self.in_features, self.first.weight)

    @property
    def stored_indices(self):
        """Integer entries stored beside the parameters (the sparse residual's column indices and row
        pointers, the interpolative form's output order); they count as parameters in llmrom's budget
        (one each, like an int32 next to a float32 value)."""
        return (self.nnz + self.out_features + 1 if self.nnz else 0) + (self.order.numel() if self.interp else 0)

    @property
    def weight(self):
        """The merged (out x in) weight; for code that inspects `.weight` (e.g. dtype checks)."""
        second, first = self.factor_matrices()
        w = second @ first
        return w + self.sparse_dense() if self.nnz else w

    @property
    def bias(self):
        return self.out_bias if self.interp == "out" else self.second.bias

    def extra_repr(self):
        sparse = f", nnz={self.nnz}" if self.nnz else ""
        form = f", interpolative ({self.interp})" if self.interp else ""
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}{sparse}{form}"


class JointFactorizedLinear(nn.Module):
    """Linears that read the same input (q/k/v, gate/up) through one shared basis: `stacked`, a
    FactorizedLinear of the stacked map [W_1; ...; W_k] (in any of its forms), gives [y_1; ...; y_k], its
    basis the top eigenvectors of the stacked outputs' covariance. The group costs one factorized product
    where its dense linears cost k.

    It stands in place of the group's first linear and returns y_1; the others are JointPart modules
    that return their slice of the same product. The product made for an input is kept until the
    group's last member has read its part, so the members called in turn on the very same tensor (as
    attention and the MLP call them) share one product; a member called on another tensor makes its own.
    """

    def __init__(self, in_features, sizes, rank, bias, dtype=None, device=None, interp=None):
        super().__init__()
        self.in_features, self.sizes, self.rank = in_features, tuple(int(n) for n in sizes), rank
        self.out_features = self.sizes[0]
        self.stacked = FactorizedLinear(in_features, sum(self.sizes), rank, bias, dtype=dtype, device=device,
                                        interp=interp)
        self._last = None  # (input, its parts) until the last member reads its part

    def products(self, x):
        """Every member's output for x, as views of one (..., sum of outputs) tensor."""
        return self.stacked(x).split(self.sizes, -1)

    def forward(self, x):
        parts = self.products(x)
        self._last = (x, parts)
        return parts[0]

    def part(self, index, x):
        """Member `index`'s output for x: from the kept product when x is the tensor it was made for."""
        last = self._last
        if index == len(self.sizes) - 1:
            self._last = None  # the last member: nothing is kept between calls of the group
        if last is not None and last[0] is x:
            return last[1][index]
        return self.products(x)[index]

    def member_weight(self, index):
        """Member `index`'s merged (out x in) weight and its bias (or None)."""
        start = sum(self.sizes[:index])
        rows = slice(start, start + self.sizes[index])
        bias = self.stacked.bias
        return self.stacked.weight[rows], None if bias is None else bias[rows]

    @property
    def weight(self):
        return self.member_weight(0)[0]

    @property
    def bias(self):
        return self.member_weight(0)[1]

    def extra_repr(self):
        return f"sizes={list(self.sizes)}, joint"


class JointPart(nn.Module):
    """A member other than the first of a JointFactorizedLinear group: its slice of the group's product.
    Holds no parameters; the group (a sibling module) is referenced, not registered, so every parameter
    is stored once, under the first member's name."""

    def __init__(self, joint, index):
        super().__init__()
        object.__setattr__(self, "joint", joint)
        self.index, self.in_features, self.out_features = index, joint.in_features, joint.sizes[index]

    def forward(self, x):
        return self.joint.part(self.index, x)

    @property
    def weight(self):
        return self.joint.member_weight(self.index)[0]

    @property
    def bias(self):
        return self.joint.member_weight(self.index)[1]

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, part {self.index} of a joint group"


def compressed_linears(model):
    """Names of the linears of `model` that are factorized: each FactorizedLinear standing for one linear, and
    every member of a joint group (not the group's stacked map)."""
    stacked = {id(m.stacked) for m in model.modules() if isinstance(m, JointFactorizedLinear)}
    return [n for n, m in model.named_modules() if isinstance(m, (JointFactorizedLinear, JointPart))
            or isinstance(m, FactorizedLinear) and id(m) not in stacked]


def joint_modules(root, members, sizes, rank, bias, dtype=None, device=None, interp=None):
    """Swap the linears `members` (dotted names under `root`) for an empty JointFactorizedLinear in place
    of the first and JointParts for the others; returns the JointFactorizedLinear."""
    old = root.get_submodule(members[0])
    w = old.weight
    joint = JointFactorizedLinear(_linear_shape(old)[1], sizes, rank, bias, dtype=dtype or w.dtype,
                                  device=device if device is not None else w.device, interp=interp)
    replace_module(root, members[0], joint)
    for i, member in enumerate(members[1:], 1):
        replace_module(root, member, JointPart(joint, i))
    return joint


class FactorizedEmbedding(nn.Module):
    """Token embedding E ~ A B: `weight` A (vocab x rank) is E P, `up` (dim x rank) is P, the top
    eigenvectors of the embedding's output covariance on the calibration tokens (LLM-ROM applied to
    the embedding layer). Keeps the scale a scaled embedding (Gemma's) multiplies its output by.

    A is called `weight` so that Hugging Face's tying of the output layer to the input embedding ties
    FactorizedHead.weight (also vocab x rank) to it unchanged."""

    def __init__(self, num_embeddings, embedding_dim, rank, padding_idx=None, embed_scale=None, dtype=None,
                 device=None):
        super().__init__()
        self.num_embeddings, self.embedding_dim, self.rank, self.padding_idx = (
            num_embeddings, embedding_dim, rank, padding_idx)
        self.weight = nn.Parameter(torch.zeros(num_embeddings, rank, dtype=dtype, device=device))
        self.up = nn.Linear(rank, embedding_dim, bias=False, dtype=dtype, device=device)
        self.embed_scale = embed_scale  # a float (a buffer would not be re-initialised after a meta-device load)

    def forward(self, input_ids):
        x = self.up(nn.functional.embedding(input_ids, self.weight, self.padding_idx))
        return x if self.embed_scale is None else x * self.embed_scale

    def merged(self):
        """The (vocab x dim) embedding matrix A B (without the scale), e.g. for a dense export."""
        return self.weight @ self.up.weight.T

    def extra_repr(self):
        return f"{self.num_embeddings}, {self.embedding_dim}, rank={self.rank}"


class FactorizedHead(nn.Module):
    """Output layer tied to a FactorizedEmbedding: logits = A (P^T h). `weight` is A, tied to the
    embedding's; `down` (rank x dim) holds P^T, a copy of the embedding's small `up` factor."""

    def __init__(self, in_features, out_features, rank, dtype=None, device=None):
        super().__init__()
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.weight = nn.Parameter(torch.zeros(out_features, rank, dtype=dtype, device=device))
        self.down = nn.Linear(in_features, rank, bias=False, dtype=dtype, device=device)

    def forward(self, hidden):
        return nn.functional.linear(self.down(hidden), self.weight)

    @property
    def macs(self):
        """Multiply-accumulates per token of the vocabulary projection (`down` is an nn.Linear)."""
        return self.weight.numel()

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, rank={self.rank}"


def factorize_embedding_modules(model, spec, dtype=None, device=None):
    """Swap the embedding named in `spec` (and its tied head, if any) for empty factorized modules
    of `spec["rank"]`, tied like the originals; returns (embedding, head or None)."""
    old = model.get_submodule(spec["name"])
    w = old.weight
    dtype, device = dtype or w.dtype, device if device is not None else w.device
    emb = FactorizedEmbedding(old.num_embeddings, old.embedding_dim, spec["rank"], old.padding_idx,
                              _embed_scale(old), dtype=dtype, device=device)
    replace_module(model, spec["name"], emb)
    head = None
    if spec.get("head"):
        head = FactorizedHead(old.embedding_dim, old.num_embeddings, spec["rank"], dtype=dtype, device=device)
        head.weight = emb.weight
        replace_module(model, spec["head"], head)
    return emb, head


def _embed_scale(embedding):
    """The constant a scaled embedding (Gemma's) multiplies its lookups by, as a float; None if plain."""
    scale = getattr(embedding, "scalar_embed_scale", None)  # Gemma 3 keeps the float beside its buffer
    if scale is None and getattr(embedding, "embed_scale", None) is not None:
        buffer = embedding.embed_scale
        if buffer.is_meta:
            raise ValueError(f"cannot read the embedding scale of {type(embedding).__name__} on the meta device")
        scale = float(buffer)
    return None if scale is None else float(scale)


def replace_module(root, dotted_name, new_module):
    """setattr on the parent of `dotted_name` (PEFT-style replacement by name)."""
    parent_name, _, child = dotted_name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, new_module)


def apply_factorization(model, meta, dtype=None, device=None):
    """Swap every module named in `meta["modules"]` for an empty FactorizedLinear of its rank."""
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise ValueError(
            f"llmrom format_version {meta.get('format_version')} is not one of {READABLE_VERSIONS}; "
            "upgrade llmrom to read this folder"
        )
    for name, spec in meta["modules"].items():
        old = model.get_submodule(name)
        out_f, in_f = _linear_shape(old)
        w = old.weight
        new = FactorizedLinear(
            in_f, out_f, spec["rank"], spec["bias"],
            dtype=dtype or w.dtype, device=device if device is not None else w.device, nnz=spec.get("nnz", 0),
            interp=spec.get("interp"),
        )
        replace_module(model, name, new)
    for spec in meta.get("joint", {}).values():
        joint_modules(model, spec["members"], spec["sizes"], spec["rank"], spec["bias"], dtype, device,
                      spec.get("interp"))
    if meta.get("embedding"):
        factorize_embedding_modules(model, meta["embedding"], dtype=dtype, device=device)
    return model


def _linear_shape(module):
    """(out_features, in_features) of nn.Linear or GPT-2 style Conv1D (weight stored in x out)."""
    if isinstance(module, nn.Linear):
        return module.out_features, module.in_features
    if type(module).__name__ == "Conv1D":
        return module.nf, module.weight.shape[0]
    raise TypeError(f"cannot factorize {type(module).__name__}: not a linear layer")


def make_factorized_class(base):
    """A subclass of the original architecture class that builds factorized modules in __init__,
    so `from_pretrained` handles dtype, sharding, tied weights and buffers as for any model."""

    def __init__(self, config, *args, **kwargs):
        base.__init__(self, config, *args, **kwargs)
        apply_factorization(self, config.llmrom)

    return type(f"Llmrom{base.__name__}", (base,), {"__init__": __init__})
