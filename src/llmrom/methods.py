"""Factorization methods: pure math, weight + input statistics in, two factors out.

Every method returns W ~ second @ first with `first` (r x d_in) and `second` (d_out x r), and a
bias for `second`. A method is registered by name in METHODS; the pipeline only calls
`METHODS[name](weight, bias, moments, rank, centered)`.

ROM (the paper): y = W x + b. With S the second moment E[x x^T] (or the covariance, when
centred), the output covariance of W x is W S W^T exactly; its top-r eigenvectors V_r minimise the
expected output error E||W x - V V^T W x||^2 over all rank-r projections. The bias is kept exactly;
when centred, the mean of the dropped directions, (I - V V^T) W E[x], is restored in the bias so
nothing is lost on average.
"""

from dataclasses import dataclass

import torch

from .errors import NonFiniteError


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
        total = float(self.spectrum.clamp_min(0).sum())
        r = self.first.shape[0]
        return float(self.spectrum[:r].clamp_min(0).sum()) / total if total > 0 else 1.0

    @property
    def relative_error(self):
        return (self.residual / self.output_energy) ** 0.5 if self.output_energy > 0 else 0.0


def output_eigh(weight, stats):
    """Eigen-decomposition (descending) of W S W^T, in the smaller of the two spaces.

    When d_out > d_in the output covariance has rank <= d_in: with S = R R^T and B = W R, the
    eigenvectors are B q / sqrt(l) for the eigenpairs (l, q) of the d_in x d_in matrix B^T B.
    """
    d_out, d_in = weight.shape
    if d_out <= d_in:
        vals, vecs = torch.linalg.eigh(weight @ stats @ weight.T)
        return vals.flip(0), vecs.flip(1)
    s_vals, s_vecs = torch.linalg.eigh(stats)
    b = weight @ (s_vecs * s_vals.clamp_min(0).sqrt())
    vals, q = torch.linalg.eigh(b.T @ b)
    vals, q = vals.flip(0), q.flip(1)
    ok = vals > vals[0].clamp_min(1e-300) * 1e-10
    vecs = torch.zeros(d_out, d_in, dtype=weight.dtype, device=weight.device)
    vecs[:, ok] = (b @ q[:, ok]) / vals[ok].sqrt()
    if not ok.all():  # null directions carry no variance; complete them to an orthonormal set
        vecs[:, ~ok] = _orthonormal_complement(vecs[:, ok], int((~ok).sum()))
    return torch.cat([vals, vals.new_zeros(d_out - d_in)]), vecs


def _orthonormal_complement(basis, k):
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = torch.randn(basis.shape[0], k, dtype=basis.dtype, generator=g).to(basis.device)
    rnd -= basis @ (basis.T @ rnd)
    return torch.linalg.qr(rnd).Q


def rom(weight, bias, moments, rank, centered=False):
    """The paper's method: keep the top-`rank` principal directions of the layer's outputs."""
    w = weight.to(torch.float64)
    second_moment = moments.second_moment()
    stats = moments.covariance() if centered else second_moment
    vals, vecs = output_eigh(w, stats)
    v = vecs[:, :rank]
    first = v.T @ w
    new_bias = _new_bias(w, bias, first, v, moments, centered)
    return _finish(w, bias, moments, second_moment, first, v, new_bias, vals, "rom")


def svd(weight, bias, moments, rank, centered=False):
    """Plain truncated SVD of the weight (data-free baseline); centred, the lost mean goes to the bias."""
    w = weight.to(torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    first = s[:rank, None] * vh[:rank]
    second_moment = moments.second_moment()
    vals, _ = output_eigh(w, second_moment)
    new_bias = _new_bias(w, bias, first, u[:, :rank], moments, centered)
    return _finish(w, bias, moments, second_moment, first, u[:, :rank], new_bias, vals, "svd")


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
    new_bias = _new_bias(w, bias, first, second, moments, centered)
    return _finish(w, bias, moments, second_moment, first, second, new_bias, vals, "whitened_svd")


def _damped_cholesky(s):
    scale = float(s.diagonal().mean().clamp_min(1e-300))
    eye = torch.eye(s.shape[0], dtype=s.dtype, device=s.device)
    for eps in (0.0, 1e-10, 1e-8, 1e-6, 1e-4, 1e-2):
        chol, info = torch.linalg.cholesky_ex(s + eps * scale * eye)
        if int(info) == 0:
            return chol
    raise NonFiniteError("whitened_svd: the input second moment is not positive definite even with damping "
                         "1e-2 x its mean diagonal (dead inputs?); use --method rom")


def _new_bias(w, bias, first, second, moments, centered):
    """The original bias; centred, plus the mean output the factors lose, (W - second first) E[x]."""
    new_bias = bias.to(torch.float64) if bias is not None else None
    if centered:
        lost_mean = (w - second @ first) @ moments.mean()
        new_bias = lost_mean if new_bias is None else new_bias + lost_mean
    return new_bias


def _finish(w, bias, moments, second_moment, first, second, new_bias, vals, name):
    """Measure the exact expected output error of the factors on the calibration inputs."""
    residual = expected_error(w - second @ first, bias, new_bias, moments, second_moment)
    energy = torch.einsum("ij,jk,ik->", w, second_moment, w)
    if bias is not None:
        b = bias.to(torch.float64)
        energy = energy + 2 * b @ (w @ moments.mean()) + b @ b
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
