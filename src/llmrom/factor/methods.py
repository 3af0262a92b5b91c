"""Factorization methods: pure math, weight + input statistics in, two factors out.

Every method returns W ~ second @ first with `first` (r x d_in) and `second` (d_out x r), and a
bias for `second`. A method is registered by name in METHODS; the pipeline calls
`METHODS[name](weight, bias, moments, rank, centered)`, or `rom_from_outputs` with the same
arguments (output moments) for rom on a linear with d_out < d_in.

ROM (the paper): y = W x + b. With S the second moment E[x x^T] (or the covariance, when
centred), the output covariance of W x is W S W^T exactly; its top-r eigenvectors V_r minimise the
expected output error E||W x - V V^T W x||^2 over all rank-r projections. The bias is kept exactly;
when centred, the mean of the dropped directions, (I - V V^T) W E[x], is restored in the bias so
nothing is lost on average.

`rom_from_outputs` is the same method from the moments of the outputs z = W x themselves
(E[z z^T] = W E[x x^T] W^T, E[z] = W E[x]): for d_out < d_in it needs d_out x d_out statistics
instead of d_in x d_in, and no product with W beyond V_r^T W.

Error correction (`rom_corrected`, --correct): the sequential loop feeds each layer the inputs x_hat
of the already-compressed model, while the dense model gives x at the same token. Instead of
reproducing W x_hat, fit the rank-r affine map A x_hat + c to the dense output W x + b: reduced-rank
regression. The full least-squares map is A_ls = W E[x x_hat^T] E[x_hat x_hat^T]^{-1} (covariances
when centred); the rank-r optimum is V_r V_r^T A_ls, V_r the top-r eigenvectors of A_ls S A_ls^T.
"""

from dataclasses import dataclass

import torch

from ..errors import NonFiniteError


def explained_fraction(spectrum, rank):
    """Share of the non-negative spectrum (descending) kept by its top `rank` values, in [0, 1]."""
    s = spectrum.clamp_min(0).double()
    total = float(s.sum())
    # a fraction of the total: a partial sum can round one ulp above it (seen: 1.0000000000000002)
    return min(1.0, float(s[:rank].sum()) / total) if total > 0 else 1.0


@dataclass
class Factors:
    first: torch.Tensor  # (r, d_in)
    second: torch.Tensor  # (d_out, r)
    bias: torch.Tensor | None  # (d_out,)
    spectrum: torch.Tensor  # eigenvalues of the output covariance, descending
    residual: float  # expected squared output error on the calibration inputs
    output_energy: float  # E||y||^2 on the calibration inputs
    sparse: object = None  # llmrom.sparse.SparseResidual when a sparse residual was added (W ~ second first + S)

    @property
    def explained(self):
        return explained_fraction(self.spectrum, self.first.shape[0])

    @property
    def relative_error(self):
        return (self.residual / self.output_energy) ** 0.5 if self.output_energy > 0 else 0.0


def output_eigh(weight, stats, stats_eigh=None, top=None):
    """Eigen-decomposition (descending) of W S W^T, in the smaller of the two spaces: all eigenvalues,
    and the eigenvectors of the `top` largest (all when None).

    When d_out > d_in the output covariance has rank <= d_in: with S = R R^T and B = W R, the
    eigenvectors are B q / sqrt(l) for the eigenpairs (l, q) of the d_in x d_in matrix B^T B.
    `stats_eigh` is torch.linalg.eigh(S) when the caller already has it (the linears of a group
    share their input, so they share it: Moments.eigh).
    """
    d_out, d_in = weight.shape
    top = d_out if top is None else min(top, d_out)
    if d_out <= d_in:
        vals, vecs = torch.linalg.eigh(weight @ stats @ weight.T)
        return vals.flip(0), vecs[:, d_out - top:].flip(1)
    s_vals, s_vecs = stats_eigh if stats_eigh is not None else torch.linalg.eigh(stats)
    b = weight @ (s_vecs * s_vals.clamp_min(0).sqrt())
    vals, q = torch.linalg.eigh(b.T @ b)
    vals, q = vals.flip(0), q.flip(1)
    ok = vals > vals[0].clamp_min(1e-300) * 1e-10
    k = int(ok[:top].sum())  # ok is a prefix: the eigenvalues descend
    vecs = torch.empty(d_out, top, dtype=weight.dtype, device=weight.device)
    vecs[:, :k] = (b @ q[:, :k]) / vals[:k].sqrt()
    if k < top:  # null directions carry no variance; complete them to an orthonormal set
        vecs[:, k:] = _orthonormal_complement(vecs[:, :k], top - k)
    return torch.cat([vals, vals.new_zeros(d_out - d_in)]), vecs


def _orthonormal_complement(basis, k):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = torch.randn(basis.shape[0], k, dtype=basis.dtype, generator=g).to(basis.device)
    rnd -= basis @ (basis.T @ rnd)
    return torch.linalg.qr(rnd).Q


def rom(weight, bias, moments, rank, centered=False):
    """The paper's method: keep the top-`rank` principal directions of the layer's outputs.

    The error needs no product with W beyond the eigen-decomposition: with S the statistics the
    eigenvectors come from (covariance C or second moment M = C + m m^T) and P = V_r V_r^T,
    e = (I - P) W x has E||e||^2 = (sum of the dropped eigenvalues of W S W^T) + k ||(I - P) W m||^2
    and E||W x||^2 = (sum of all of them) + k ||W m||^2, with k = 1 centred and 0 uncentred.
    """
    w = weight.to(torch.float64)
    if w.shape[0] > w.shape[1]:  # through the input statistics' own eigen-decomposition, shared by the group
        vals, v = output_eigh(w, None, moments.eigh(centered), top=rank)
    else:
        vals, v = output_eigh(w, moments.covariance() if centered else moments.second_moment(), top=rank)
    first = v.T @ w
    out_mean = w @ moments.mean()
    err_mean = out_mean - v @ (first @ moments.mean())
    k = 1.0 if centered else 0.0
    return _factors(first, v, bias, vals, centered, "rom",
                    err_sq=vals[rank:].sum() + k * (err_mean @ err_mean), err_mean=err_mean,
                    out_sq=vals.sum() + k * (out_mean @ out_mean), out_mean=out_mean)


def svd(weight, bias, moments, rank, centered=False):
    """Plain truncated SVD of the weight (data-free baseline); centred, the lost mean goes to the bias."""
    w = weight.to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first = s[:rank, None] * vh[:rank]
    second_moment = moments.second_moment()
    vals, _ = output_eigh(w, second_moment, top=0)
    return _finish(w, bias, moments, second_moment, first, u[:, :rank], vals, centered, "svd")


def whitened_svd(weight, bias, moments, rank, centered=False):
    """SVD-LLM (W): truncated SVD of W L, with S = L L^T the Cholesky factor of the input second moment.

    W ~ U_r diag(s_r) V_r^T L^{-1}: `second` = U_r, `first` = diag(s_r) V_r^T L^{-1}. Its truncation is
    the optimum of uncentred output PCA (W S W^T = U diag(s)^2 U^T), so at equal ranks it equals
    `rom` uncentred; it is here as the peer's recipe for baselines. When S is not positive definite
    (dead or collinear inputs) the documented fallback adds the smallest damping eps * mean(diag S) * I,
    eps = 1e-10, 1e-8, ..., 1e-2, that makes the Cholesky succeed; beyond that it is an error.
    """
    w = weight.to(torch.float64)
    second_moment = moments.second_moment()
    chol = _damped_cholesky(second_moment)
    u, sv, vh = torch.linalg.svd(w @ chol, full_matrices=False)
    first = torch.linalg.solve_triangular(chol, sv[:rank, None] * vh[:rank], upper=False, left=False)
    second = u[:, :rank]
    vals = torch.cat([sv ** 2, sv.new_zeros(max(0, w.shape[0] - sv.shape[0]))])
    return _finish(w, bias, moments, second_moment, first, second, vals, centered, "whitened_svd")


CORRECT_DAMP = 1e-2  # ridge of the correction, relative to each input's own variance (see rom_corrected)


def rom_corrected(weight, bias, cross, rank, centered=False, damp=CORRECT_DAMP):
    """ROM calibrated toward the DENSE model's outputs: reduced-rank regression from x_hat to W x + b.

    `cross` (stats.CrossMoments) holds the joint moments of the compressed input x_hat and the
    upstream error e = x_hat - x. With S = E[x_hat x_hat^T] and G = E[e x_hat^T] (covariances when
    centred), E[x x_hat^T] = S - G and the least-squares map is A_ls = W (S - G) S^{-1} = W - W G S^{-1}.

    Damped solve: the regression is fitted on a few thousand tokens in up to d_in dimensions, so it
    is a ridge that pulls A toward W (not toward 0): minimise E||A x_hat - W x||^2 + ||(A - W) R^{1/2}||_F^2
    with R = damp * diag(S) (+ 1e-12 * mean diag(S), which keeps dead inputs solvable), i.e.
    A_ls = W - W G (S + R)^{-1}. Each input is damped by its own variance, so outlier channels do not
    set the damping of the others; x_hat == x gives G == 0 and A_ls == W exactly, i.e. plain `rom`.
    Then `second` = V_r (top-r eigenvectors of A_ls S A_ls^T), `first` = V_r^T A_ls; centred, the bias
    is b + W E[x] - second first E[x_hat] (no mean error); uncentred, it stays b. `residual` and
    `output_energy` are measured exactly from the moments against the dense target W x + b.
    """
    w = weight.to(torch.float64)
    s = cross.hat.covariance() if centered else cross.hat.second_moment()
    g = cross.error_hat_covariance() if centered else cross.error_hat_moment()
    diag = s.diagonal()
    reg = damp * diag.clamp_min(0) + 1e-12 * float(diag.mean().clamp_min(1e-300))
    a = w - torch.linalg.solve(s + torch.diag(reg), (w @ g).T).T  # S + R is symmetric
    vals, second = output_eigh(a, s, top=rank)
    first = second.T @ a
    b = bias.to(torch.float64) if bias is not None else None
    new_bias = b
    if centered:
        restored = w @ cross.dense_mean() - second @ (first @ cross.hat.mean())
        new_bias = restored if b is None else b + restored
    # error = D x_hat + W e + shift, D = second first - W, shift = new bias - b (0 uncentred)
    diff = second @ first - w
    residual = (torch.einsum("ij,jk,ik->", diff, cross.hat.second_moment(), diff)
                + 2 * torch.einsum("ij,kj,ik->", diff, cross.error_hat_moment(), w)
                + torch.einsum("ij,jk,ik->", w, cross.err.second_moment(), w))
    if centered:
        shift = new_bias - b if b is not None else new_bias
        residual = residual + 2 * shift @ (diff @ cross.hat.mean() + w @ cross.err.mean()) + shift @ shift
    energy = torch.einsum("ij,jk,ik->", w, cross.dense_second_moment(), w)
    if b is not None:
        energy = energy + 2 * b @ (w @ cross.dense_mean()) + b @ b
    for t in (first, second, residual):
        if not torch.isfinite(t).all():
            raise NonFiniteError("rom_corrected: non-finite factors (ill-conditioned statistics)")
    return Factors(first, second, new_bias, vals, max(float(residual), 0.0), float(energy))


def _damped_cholesky(s):
    scale = float(s.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    for eps in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex(s + eps * scale * eye)
        if int(info) == 0:
            return chol
    raise NonFiniteError("whitened_svd: the input second moment is not positive definite even with damping "
                         "1e-2 x its mean diagonal (dead inputs?); use --method rom")


def rom_from_outputs(weight, bias, out_moments, rank, centered=False):
    """`rom` from the moments of the outputs z = W x (bias excluded) instead of the inputs x.

    With E[z z^T] = W E[x x^T] W^T and E[z] = W E[x], the output covariance that `rom` builds as
    W S W^T is measured directly: V_r are its top-r eigenvectors, `first` = V_r^T W, `second` = V_r,
    and bias and error follow from the same moments. The statistics are d_out x d_out; W is read in
    its own dtype, a block of columns at a time, so nothing d_in x d_in and no float64 copy of W
    is formed. Equal to `rom` on the same calibration data (up to the rounding of z in the model's
    dtype).
    """
    d_out = weight.shape[0]
    if out_moments.xx.shape != (d_out, d_out):
        raise ValueError(f"rom_from_outputs: output moments are {tuple(out_moments.xx.shape)}, the weight has "
                         f"{d_out} outputs")
    second_moment = out_moments.second_moment()
    stats = out_moments.covariance() if centered else second_moment
    vals, vecs = torch.linalg.eigh(stats)
    vals, v = vals.flip(0), vecs[:, d_out - min(rank, d_out):].flip(1)  # top eigenpairs, descending
    del stats, vecs
    first = _project(v, weight)
    # error before biases: e = (I - V V^T) z, so E||e||^2 = tr(M) - tr(V^T M V) and E[e] = (I - V V^T) E[z]
    mean, energy = out_moments.mean(), second_moment.trace()
    return _factors(first, v, bias, vals, centered, "rom",
                    err_sq=energy - (v * (second_moment @ v)).sum(), err_mean=mean - v @ (v.T @ mean),
                    out_sq=energy, out_mean=mean)


def _project(v, weight, block=1024):
    """V^T W in float64, converting W to float64 one block of `block` columns at a time."""
    out = v.new_empty(v.shape[1], weight.shape[1])
    for j in range(0, weight.shape[1], block):
        out[:, j:j + block] = v.T @ weight[:, j:j + block].to(v.dtype)
    return out


def _finish(w, bias, moments, second_moment, first, second, vals, centered, name):
    """Factors of W ~ second @ first measured on the input moments: with D = W - second @ first,
    the error before biases is D x, so E||D x||^2 = tr(D M D^T), E[D x] = D m, E||W x||^2 = tr(W M W^T)."""
    diff = w - second @ first
    mean = moments.mean()
    return _factors(first, second, bias, vals, centered, name,
                    err_sq=torch.einsum("ij,jk,ik->", diff, second_moment, diff), err_mean=diff @ mean,
                    out_sq=torch.einsum("ij,jk,ik->", w, second_moment, w), out_mean=w @ mean)


def _factors(first, second, bias, vals, centered, name, err_sq, err_mean, out_sq, out_mean):
    """Bias, exact expected output error and energy from the moments of e (the error before biases)
    and of W x, in whichever space they were measured.

    The new bias is the original one; centred, plus the mean output the factors lose, E[e]. With
    shift = new bias - old bias (0 or E[e]) the error is e - shift, so
    E||e - shift||^2 = E||e||^2 - 2 shift . E[e] + |shift|^2, and E||y||^2 = E||W x||^2 + 2 b . E[W x] + |b|^2.
    """
    old = bias.to(torch.float64) if bias is not None else None
    new_bias = old
    residual, energy = err_sq, out_sq
    if centered:
        shift = err_mean
        new_bias = shift if old is None else old + shift
        residual = residual - 2 * shift @ err_mean + shift @ shift
    if old is not None:
        energy = energy + 2 * old @ out_mean + old @ old
    for t in (first, second, residual):
        if not torch.isfinite(t).all():
            raise NonFiniteError(f"{name}: non-finite factors (ill-conditioned statistics)")
    return Factors(first, second, new_bias, vals, max(float(residual), 0.0), float(energy))


def expected_error(diff, bias, new_bias, moments, second_moment):
    """E||(W x + b) - (W_hat x + b_hat)||^2 over the calibration inputs, with diff = W - W_hat (a tensor)."""
    bias_shift = (new_bias if new_bias is not None else 0) - (bias.to(torch.float64) if bias is not None else 0)
    # E||D x - shift||^2 = tr(D M D^T) - 2 shift . D m + |shift|^2   (shift: bias change, 0 or the mean term)
    residual = torch.einsum("ij,jk,ik->", diff, second_moment, diff)
    if new_bias is not None:
        residual = residual - 2 * bias_shift @ (diff @ moments.mean()) + bias_shift @ bias_shift
    return residual


METHODS = {"rom": rom, "svd": svd, "whitened_svd": whitened_svd}
