"""Low-rank plus sparse after training (the idea of LOST and DSFormer): W ~ second @ first + S.

Pure math, like llmrom.methods. Once the low-rank factors L = second @ first are fixed, the residual
R = W - L is left; S keeps `nnz` of its entries, chosen on the calibration data with C the input
statistics the factors were fitted to (the covariance when centred, else the second moment):

* support, `entries` (default): the nnz entries with the largest |R_ij| sqrt(C_jj). R_ij^2 C_jj is
  the expected squared output error of dropping entry (i, j) alone, so these are the entries whose
  independent removal costs most (Wanda's input-scaled saliency);
  `channels`: whole input columns, ranked by sum_i R_ij^2 C_jj (LOST's channel-wise sparsity),
  floor(nnz / d_out) of them; the nonzeros a partial column would need are left unspent.
* values: with the support fixed, each row is refitted by least squares on the same statistics,
  s_J = C_JJ^{-1} (C r)_J, the exact minimiser of E||(R - S) x||^2 for that support (rows are
  independent), so the correlations between inputs count, not only their variances. `refit=False`
  keeps the raw residual entries R_ij.
* bias: centred, the mean of what is still lost, (W - L - S) E[x], is restored in the bias.
* rounds (low_rank_plus_sparse): optionally alternate, refitting the factors to W - S and then S to
  the new residual (robust PCA's alternating scheme, as in LOST), keeping the best round; the plain
  factorization at the full rank of the same budget competes too, and wins where it fits better.

S is stored in CSR form: nnz values, nnz int32 column indices and d_out + 1 int32 row pointers.
llmrom's budget counts every stored integer as one parameter, so a nonzero costs 2 and the row
pointers d_out + 1 (llmrom.ranks.LinearShape.sparse_params).
"""

from dataclasses import dataclass, replace

import torch

from ..errors import LlmromError, NonFiniteError
from ..modeling.factorized import csr_dense, csr_rows
from .methods import expected_error

SELECTIONS = ("entries", "channels")


@dataclass
class SparseResidual:
    crow: torch.Tensor  # (d_out + 1,) int32 row pointers
    col: torch.Tensor  # (nnz,) int32 column indices, by row then column
    values: torch.Tensor  # (nnz,) float64

    @property
    def nnz(self):
        return int(self.col.numel())

    def rows(self):
        return csr_rows(self.crow, self.nnz)

    def dense(self, d_in):
        return csr_dense(self.crow, self.col, self.values, d_in, self.values)


def low_rank_plus_sparse(method, weight, bias, moments, rank, nnz, centered=False, select="entries", rounds=1,
                         plain_rank=None):
    """W ~ L + S with L of rank `rank` from `method` (a METHODS entry) and S of `nnz` nonzeros.

    Round 1 factorizes W and adds the sparse residual of what is left (add_sparse). Each further
    round alternates, as robust PCA and LOST do: the factors are refitted to W - S (for ROM, the
    exact optimum given S), then S is chosen again for the new residual. The round with the lowest
    expected output error is returned. With `plain_rank` (the rank the same parameters buy without a
    sparse part), the plain factorization at that rank competes too and is returned (sparse None)
    where it fits the calibration data better, so a module never does worse than without --sparse.
    """
    if rounds < 1:
        raise LlmromError(f"--sparse-rounds must be a positive integer, got {rounds}")
    if plain_rank is not None and plain_rank > rank:
        # every method's factors are nested (ordered directions): the rank-`rank` ones are a prefix
        plain = method(weight, bias, moments, plain_rank, centered)
        low = replace(plain, first=plain.first[:rank], second=plain.second[:, :rank])  # add_sparse redoes the bias
    else:
        plain, low = None, method(weight, bias, moments, rank, centered)
    best = f = add_sparse(weight, bias, moments, low, nnz, centered, select)
    w = weight.to(torch.float64)
    for _ in range(rounds - 1):
        if f.sparse is None:
            break
        refit = method(w - f.sparse.dense(w.shape[1]), bias, moments, rank, centered)
        f = add_sparse(weight, bias, moments, refit, nnz, centered, select)
        f = replace(f, output_energy=low.output_energy)  # of W, not of W - S
        if f.residual < best.residual:
            best = f
    return plain if plain is not None and plain.residual <= best.residual else best


def add_sparse(weight, bias, moments, factors, nnz, centered=False, select="entries", refit=True):
    """`factors` (from a METHODS entry for the same weight, bias, moments, centred) plus a sparse
    residual of at most `nnz` nonzeros: a new Factors with `sparse`, the bias and the error updated."""
    if select not in SELECTIONS:
        raise LlmromError(f"unknown sparse selection {select!r}; choose one of {list(SELECTIONS)}")
    w = weight.to(torch.float64)
    d_out, d_in = w.shape
    if not 0 < nnz <= d_out * d_in:
        raise LlmromError(f"a sparse residual of a {d_out} x {d_in} matrix holds 1 to {d_out * d_in} nonzeros, "
                          f"got {nnz}")
    second_moment = moments.second_moment()
    stats = moments.covariance() if centered else second_moment
    resid = w - factors.second @ factors.first
    rows, cols = select_support(resid, stats.diagonal(), nnz, select)
    if rows.numel() == 0:
        return factors
    rc = resid @ stats  # (C r_i)_j = (R C)_ij, C symmetric
    if refit:
        values, quad = refit_values(rc, stats, rows, cols)
        # centred or not, the bias below makes the error tr(D C D^T) with D = R - S:
        residual = (resid * rc).sum() - 2 * (values * rc[rows, cols]).sum() + quad
    else:
        values = resid[rows, cols]
    s = torch.zeros_like(w)
    s[rows, cols] = values
    new_bias = factors.bias
    if centered:  # restore the mean of what is still lost, (W - L - S) E[x]
        lost_mean = (resid - s) @ moments.mean()
        new_bias = lost_mean if bias is None else bias.to(torch.float64) + lost_mean
    if not refit:
        residual = expected_error(resid - s, bias, new_bias, moments, second_moment)
    if not (torch.isfinite(values).all() and torch.isfinite(residual)):
        raise NonFiniteError("sparse residual: non-finite values (ill-conditioned statistics)")
    crow = torch.zeros(d_out + 1, dtype=torch.int64, device=w.device)
    crow[1:] = torch.bincount(rows, minlength=d_out).cumsum(0)
    sparse = SparseResidual(crow.to(torch.int32), cols.to(torch.int32), values)
    return replace(factors, bias=new_bias, residual=max(float(residual), 0.0), sparse=sparse)


def select_support(resid, diag, nnz, select="entries"):
    """(rows, cols) int64 of the kept entries, ordered by row then column."""
    d_out, d_in = resid.shape
    scale = diag.clamp_min(0)
    if select == "entries":
        score = (resid.abs() * scale.sqrt()).flatten()
        idx = torch.sort(torch.topk(score, nnz, sorted=False).indices).values
        return idx // d_in, idx % d_in
    n_cols = min(nnz // d_out, d_in)
    chosen = torch.sort(torch.topk((resid ** 2).sum(0) * scale, n_cols, sorted=False).indices).values
    rows = torch.arange(d_out, device=resid.device).repeat_interleave(n_cols)
    return rows, chosen.repeat(d_out)


def refit_values(rc, stats, rows, cols, max_elements=1 << 22):
    """(values, sum_i s_i^T C s_i): per row i with support J, argmin_s (r_i - s)^T C (r_i - s) over s
    supported on J, the solution of C_JJ s_J = (C r_i)_J, with `rc` = R C. A tiny ridge
    (1e-8 x mean C_jj) keeps collinear inputs solvable; the quadratic form is of C itself."""
    d_out, d_in = rc.shape
    counts = torch.bincount(rows, minlength=d_out)
    start = torch.cumsum(counts, 0) - counts
    pos = torch.arange(rows.numel(), device=rows.device) - start[rows]
    width = int(counts.max())
    support = torch.zeros(d_out, width, dtype=torch.long, device=rows.device)
    mask = torch.zeros(d_out, width, dtype=torch.bool, device=rows.device)
    support[rows, pos], mask[rows, pos] = cols, True
    rhs = rc.gather(1, support) * mask
    ridge = 1e-8 * float(stats.diagonal().mean().clamp_min(0))
    if ridge == 0:  # every input is dead (C = 0): nothing to fit, nothing to measure
        return rc.new_zeros(rows.numel()), rc.new_zeros(())
    out, quad = torch.zeros_like(rhs), rc.new_zeros(())
    flat = stats.reshape(-1)
    order = torch.argsort(counts)  # rows of similar support sizes are solved together, padded to the largest
    i = 0
    while i < d_out:
        guess = min(d_out, i + max(1, max_elements // max(int(counts[order[i]]) ** 2, 1)))
        width = max(int(counts[order[guess - 1]]), 1)  # the widest row of the guessed chunk bounds its size
        idx = order[i:min(guess, i + max(1, max_elements // (width * width)))]
        j, m = support[idx, :width], mask[idx, :width]
        a = flat.take(j[:, :, None] * d_in + j[:, None, :])
        a.masked_fill_(~(m[:, :, None] & m[:, None, :]), 0.0)
        a.diagonal(dim1=1, dim2=2).add_(torch.where(m, ridge, 1.0).to(a.dtype))  # padding: identity, solution 0
        chol, info = torch.linalg.cholesky_ex(a)
        b = rhs[idx, :width, None]
        sol = torch.cholesky_solve(b, chol) if not bool(info.any()) else torch.linalg.solve(a, b)
        out[idx, :width] = sol[..., 0]
        quad += (sol * (a @ sol)).sum() - ridge * (sol ** 2).sum()  # s^T (C_JJ + ridge) s - ridge |s|^2
        i += len(idx)
    return out[rows, pos], quad
