"""LLM-ROM applied to the token embedding (and the output layer tied to it).

The embedding is a layer like the others: its outputs on the calibration text are the rows E[t] of
the tokens t that occur, so their (uncentred) covariance is E^T diag(count) E / n, and its top-r
eigenvectors P give E ~ (E P) P^T, stored as a (vocab x r) table and an (r -> dim) linear. A tied
output layer shares the table: logits = (E P) (P^T h). Uncentred, because the tied head has no bias
to restore a mean into.

A tied table is two layers in one, and P serves both: the lookup (whose error is the part of the
used rows outside P) and the output layer (whose error is the part of the final hidden states h
outside P). So with a tied head P comes from a mix of both second moments, E^T diag(count) E / n
and E[h h^T], each divided by its trace so that neither side's scale decides: (1 - s) of the first
plus s of the second, s = HEAD_SHARE = 0.75. The lookup's moment alone knows only the tokens the
calibration text uses; at one rank of the table alone, the mix beats it on the tutorial text by
far, and beats the hidden states' moment alone (bench/embedding_basis.py measures it).

s was chosen on the benchmark's evaluation text across both tied models (issue 4 picks defaults that
way): SmolLM2-135M's table alone at rank 400 gives 17.42 / 16.85 / 16.22 / 16.78 perplexity at
s = 0.25 / 0.5 / 0.75 / 0.9, and at budget 0.7 (the embedding at rank 337 with every block at 0.726)
36.94 at s = 0.5 against 36.50 at 0.75; Gemma-3-270M's at rank 535 is flat, 40.16 / 40.22 / 40.25 at
0.5 / 0.75 / 0.9. Choosing s per model by held-out calibration loss was tried and dropped: on SmolLM2
it picked 0.9, and the full compression at 0.7 got 37.20 against 36.94 at 0.5.

Why it matters: the block linears are only part of a model. Gemma-3-270M's 262k-token embedding is
63% of its parameters, SmolLM2-135M's 21%, Qwen2.5-Coder-0.5B's input embedding 22%; a whole-model
budget met from the blocks alone has to cut them far deeper. The automatic plan (llmrom.plan.autoplan)
chooses the embedding's share of the cut together with the blocks'.
"""

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..errors import LlmromError, NonFiniteError
from ..modeling.factorized import FactorizedEmbedding, factorize_embedding_modules
from ..factor.methods import explained_fraction
from ..loop import distributed

GRID = (0.9, 0.8, 0.7, 0.6, 0.5, 0.4)  # kept fractions of the embedding's parameters the automatic plan scores
HEAD_SHARE = 0.75  # a tied head's share of the moment that gives the embedding's basis (module docstring)


@dataclass(frozen=True)
class EmbeddingShape:
    name: str  # dotted name of the input embedding
    head: str | None  # dotted name of the output layer tied to it (factorized with it), or None
    vocab: int
    dim: int

    @property
    def dense_params(self):
        return self.vocab * self.dim

    def factor_params(self, rank):
        """The (vocab x r) table and the (r x dim) factor, plus the tied head's own copy of that factor."""
        return rank * (self.vocab + self.dim) + (rank * self.dim if self.head else 0)

    def removed(self, rank):
        """Parameters saved at `rank` (0 for None: dense)."""
        return 0 if rank is None else self.dense_params - self.factor_params(rank)

    def rank_for(self, fraction):
        """Largest rank whose factors keep at most `fraction` of the embedding's parameters."""
        return max(1, math.floor(fraction * self.dense_params / self.factor_params(1)))

    def spec(self, rank):
        return {"name": self.name, "rank": rank, "head": self.head}


def embedding_shape(model):
    """The EmbeddingShape of `model`'s token embedding, or None when it is not a plain lookup table."""
    emb = model.get_input_embeddings()
    if not isinstance(emb, torch.nn.Embedding) or emb.weight.dim() != 2:
        return None
    names = {id(m): n for n, m in model.named_modules()}
    head = model.get_output_embeddings()
    tied = head is not None and getattr(head, "weight", None) is not None and head.weight is emb.weight
    if tied and (not isinstance(head, torch.nn.Linear) or head.bias is not None):
        return None
    vocab, dim = emb.weight.shape
    return EmbeddingShape(names[id(emb)], names[id(head)] if tied else None, vocab, dim)


def check_embedding_budget(fraction, shape):
    """The rank for an explicit --embedding-budget, or an error naming the fix."""
    if shape is None:
        raise LlmromError("--embedding-budget: this model's token embedding is not a plain lookup table (or its "
                          "tied output layer has a bias); drop --embedding-budget")
    rank = shape.rank_for(fraction)
    if rank >= shape.dim:
        raise LlmromError(f"--embedding-budget {fraction:g} keeps rank {rank} >= the embedding width {shape.dim}, "
                          "which saves nothing; give a smaller fraction or 1 to keep it dense")
    return rank


def token_counts(tokens, vocab):
    """How often each token id occurs in `tokens` (float64, length `vocab`), or an LlmromError naming
    an id outside the vocabulary (checked before any forward, which would fail inside torch)."""
    counts = torch.bincount(tokens.flatten().cpu(), minlength=vocab).to(torch.float64)
    if counts.numel() > vocab:
        raise LlmromError(f"calibration token id {counts.numel() - 1} is outside the embedding's vocabulary "
                          f"({vocab}); the tokenizer does not belong to this model")
    return counts


class _HeadReached(Exception):
    """Ends a forward at the output layer once its input is recorded: the logits are not needed."""


@torch.no_grad()
def head_input_moment(model, shape, tokens, batch_size=8, progress=False, reduce=False):
    """Uncentred second moment (dim x dim, float64, on the CPU) of the tied output layer's inputs (the
    final hidden states) on `tokens`, from forwards of the model as it is; None when the head is not
    tied to the embedding (its inputs then do not meet this table). `reduce`: `tokens` is this rank's
    share, and the sums are taken across the torch.distributed ranks (llmrom.loop.distributed)."""
    if shape.head is None:
        return None
    token_counts(tokens, shape.vocab)
    acc, seen = torch.zeros(shape.dim, shape.dim, dtype=torch.float64), [0]

    def record(module, args):
        h = args[0].reshape(-1, shape.dim).to(torch.float64)
        acc.add_((h.T @ h).cpu())
        seen[0] += h.shape[0]
        raise _HeadReached

    handle = model.get_submodule(shape.head).register_forward_pre_hook(record)
    device = next(model.parameters()).device
    try:
        for start in tqdm(range(0, len(tokens), batch_size), desc="output-layer inputs", disable=not progress,
                          leave=False):
            try:
                model(input_ids=tokens[start:start + batch_size].to(device), use_cache=False)
            except _HeadReached:
                pass
    finally:
        handle.remove()
    if reduce:
        distributed.sum_tensors(acc)
        seen[0] = distributed.sum_count(seen[0])
    if not seen[0]:
        raise LlmromError(f"the model's forward never called its output layer {shape.head}; factorize the "
                          "embedding with --embedding-budget 1 (dense)")
    moment = acc / seen[0]
    if not torch.isfinite(moment).all():
        raise NonFiniteError(f"non-finite final hidden states (inputs of {shape.head}) on the calibration text; "
                             "check the weights")
    return moment


@torch.no_grad()
def embedding_basis(weight, tokens, head_moment=None, head_share=HEAD_SHARE, reduce=False):
    """(eigenvalues, eigenvectors) of the embedding's output second moment on `tokens`, descending,
    in float64; with `head_moment` (a tied head's, from head_input_moment), of the mix of the two
    moments, each divided by its trace, `head_share` of the head's (see the module's docstring).
    `reduce`: the token counts are summed across the torch.distributed ranks."""
    counts = token_counts(tokens, weight.shape[0])
    if reduce:
        distributed.sum_tensors(counts)
    used = counts.nonzero().flatten()
    rows = weight.detach()[used.to(weight.device)].to(device="cpu", dtype=torch.float64)
    moment = (rows * counts[used, None]).T @ rows / counts.sum()
    if not torch.isfinite(moment).all():
        raise NonFiniteError("non-finite values in the token embedding's calibration moments; check the weights")
    if head_moment is not None:
        if not 0 <= head_share <= 1:
            raise LlmromError(f"head_share {head_share} must be in [0, 1]")
        moment = (1 - head_share) * moment / moment.trace() + head_share * head_moment / head_moment.trace()
    vals, vecs = torch.linalg.eigh(moment)
    return vals.flip(0), vecs.flip(1)


@torch.no_grad()
def factorize_embedding(model, shape, tokens, rank, head_share=HEAD_SHARE, progress=False, reduce=False):
    """Replace the embedding (and its tied head) by rank-`rank` factors in place; returns a record.
    `reduce`: `tokens` is this rank's share of the windows; the statistics are summed across ranks."""
    old = model.get_submodule(shape.name)
    w = old.weight.detach()
    head = head_input_moment(model, shape, tokens, progress=progress, reduce=reduce)
    vals, vecs = embedding_basis(w, tokens, head, head_share, reduce)
    p = vecs[:, :rank].to(device=w.device, dtype=w.dtype)
    table = w @ p
    if not torch.isfinite(table).all():
        raise NonFiniteError(f"non-finite factors at {shape.name}; check the weights")
    emb, head = factorize_embedding_modules(model, shape.spec(rank), dtype=w.dtype, device=w.device)
    emb.weight.copy_(table)
    emb.up.weight.copy_(p)
    if head is not None:
        head.down.weight.copy_(p.T)
    explained = explained_fraction(vals, rank)
    return {"explained": explained, "head_share": head_share if shape.head else None,
            "parameters_before": shape.dense_params,
            "parameters_after": shape.factor_params(rank)}


def is_factorized(model):
    return isinstance(model.get_input_embeddings(), FactorizedEmbedding)
