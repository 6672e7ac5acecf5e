"""MOODv2-style OOD scores on MVTM token features and logits (issue #7), plain numpy.

Inputs: per-token hidden states h [n, d] = the input of the final vocabulary Linear, so that
logits = h @ W.T + b with W [K, d], b [K] over the K = 256 codes only (drop the [MASK] row), and logits [n, K].
Every score is "higher = more anomalous" (MOODv2 uses the opposite sign).

Numerics (see shared/notes/moodv2-scores.md): inputs may be float16 (AMP), whose sums of squares overflow,
so every chunk is cast to float64 before any product, norm or logsumexp; second moments are accumulated in
float64 over row chunks so a few 1e5 tokens never need a full float64 copy; `eigh` (symmetric, sorted, real)
replaces the reference code's `eig`. Fitting is deterministic: fixed chunk order, no randomness.

Fitted statistics are dataclasses of numpy arrays and scalars; `stats_to_tensors` / `stats_from_tensors`
flatten them to a dict of arrays for a safetensors file.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import scipy.linalg
import scipy.sparse
from scipy.special import logsumexp

CHUNK = 65536   # rows per float64 chunk: 65536 x 512 x 8 B = 256 MiB at most


def _chunks(n: int, chunk: int = CHUNK):
    """Row slices covering range(n) in order (fixed order keeps float sums deterministic)."""
    for start in range(0, n, chunk):
        yield slice(start, min(start + chunk, n))


def _as_2d(x, name: str) -> np.ndarray:
    x = np.asarray(x)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a non-empty [n, d] array, got shape {x.shape}")
    return x


def _as_codes(codes, n: int, num_codes: int) -> np.ndarray:
    codes = np.asarray(codes)
    if codes.shape != (n,) or not np.issubdtype(codes.dtype, np.integer):
        raise ValueError(f"codes must be an integer array of shape ({n},), got {codes.dtype} {codes.shape}")
    if codes.min() < 0 or codes.max() >= num_codes:
        raise ValueError(f"codes must lie in [0, {num_codes}), got [{codes.min()}, {codes.max()}]")
    return codes


# ----------------------------------------------------------------------------- ViM / Residual

@dataclass
class ViMStats:
    """Virtual-logit matching (Wang et al. 2022, MOODv2's best score) fitted on healthy tokens."""
    u: np.ndarray       # [d] float64, origin -W^+ b (logits at u are 0, or least-squares 0 if K < d)
    R: np.ndarray       # [d, d-D] float64, eigenvectors of the covariance about u beyond the top D
    alpha: float        # mean max-logit / mean residual over the fit tokens
    D: int              # dimension of the principal subspace


def fit_vim(h, W, b, dim: int | None = None) -> ViMStats:
    """Fit ViM on fit tokens h [n, d] (healthy, foreground only) and the vocabulary head W [K, d], b [K].

    The covariance is taken about u without mean-centring (as in ViM/MOODv2). dim = D, default d // 2.
    Raises ValueError if alpha is not positive (mean max-logit <= 0): the score would then reward residuals.
    """
    h = _as_2d(h, "h")
    n, d = h.shape
    W = np.asarray(W, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if W.ndim != 2 or W.shape[1] != d or b.shape != (W.shape[0],):
        raise ValueError(f"W must be [K, {d}] and b [K], got W {W.shape} and b {b.shape}")
    D = d // 2 if dim is None else int(dim)
    if not 0 < D < d:
        raise ValueError(f"dim must be in (0, {d}), got {D}")
    u = np.linalg.lstsq(W, -b, rcond=None)[0]                       # [d], = -pinv(W) @ b
    cov = np.zeros((d, d))
    for sl in _chunks(n):
        x = h[sl].astype(np.float64) - u                             # [c, d]
        cov += x.T @ x
    cov /= n
    _, vecs = np.linalg.eigh(cov)                                    # ascending eigenvalues
    R = np.ascontiguousarray(vecs[:, : d - D])                       # [d, d-D]: all but the top D
    residual_sum = max_logit_sum = norm_sum = 0.0
    for sl in _chunks(n):
        x = h[sl].astype(np.float64)
        residual_sum += float(np.linalg.norm((x - u) @ R, axis=1).sum())
        norm_sum += float(np.linalg.norm(x - u, axis=1).sum())
        max_logit_sum += float((x @ W.T + b).max(axis=1).sum())
    if residual_sum <= 1e-6 * norm_sum:     # float32 features carry ~1e-7 relative noise: a residual that small
        raise ValueError("the fit features lie in the principal subspace (zero residual): lower dim")  # is noise
    alpha = max_logit_sum / residual_sum
    if alpha <= 0.0:
        raise ValueError(f"ViM alpha = {alpha:.4g} <= 0: the mean max-logit of the fit tokens is not positive")
    return ViMStats(u=u, R=R, alpha=alpha, D=D)


def residual_score(h, stats: ViMStats) -> np.ndarray:
    """Residual ||R^T (h - u)||, [n]: the norm of h outside the principal subspace of healthy tokens."""
    h = _as_2d(h, "h")
    out = np.empty(h.shape[0])
    for sl in _chunks(h.shape[0]):
        out[sl] = np.linalg.norm((h[sl].astype(np.float64) - stats.u) @ stats.R, axis=1)
    return out


def vim_score(h, logits, stats: ViMStats) -> np.ndarray:
    """ViM score alpha * residual - logsumexp(logits), [n] (MOODv2's ViM with the sign flipped)."""
    return stats.alpha * residual_score(h, stats) - _logsumexp_rows(logits)


# ----------------------------------------------------------------------------- Mahalanobis

@dataclass
class MahalanobisStats:
    """Code-conditional Gaussians with one shared covariance, fitted on healthy tokens."""
    means: np.ndarray       # [K, d] float64, per-code means shrunk toward the global mean
    precision: np.ndarray   # [d, d] float64, inverse of the ridged shared code-centred covariance


def fit_mahalanobis(h, codes, num_codes: int, tau: float = 50.0) -> MahalanobisStats:
    """Fit code-conditional means and a shared precision on h [n, d] with codes [n] in [0, num_codes).

    Means: mu_k <- (n_k mu_k + tau mu) / (n_k + tau), so rare codes lean on the global mean mu; unseen codes
    get mu. Covariance: the maximum-likelihood within-code scatter (centred on the raw code means), plus a ridge
    1e-6 * tr(cov) / d before a Cholesky inverse. A ridge rather than Ledoit-Wolf because (a) with n (2-5e5
    tokens) >> d the sample covariance is already well estimated and needs regularising only along the
    near-null direction of LayerNorm'd features, which a tiny ridge fixes without biasing the other
    directions; (b) it works from chunked float64 sums, where sklearn's LedoitWolf needs all centred
    features as one float64 [n, d] array.
    """
    h = _as_2d(h, "h")
    n, d = h.shape
    codes = _as_codes(codes, n, num_codes)
    if tau < 0:
        raise ValueError(f"tau must be >= 0, got {tau}")
    counts = np.bincount(codes, minlength=num_codes).astype(np.float64)   # [K]
    sums = np.zeros((num_codes, d))                                       # [K, d]
    for sl in _chunks(n):
        c = codes[sl]
        onehot = scipy.sparse.csr_matrix(                                 # [K, c]: sums rows by code
            (np.ones(c.size), (c, np.arange(c.size))), shape=(num_codes, c.size))
        sums += onehot @ h[sl].astype(np.float64)
    mu = sums.sum(axis=0) / n                                             # [d]
    seen = counts > 0
    raw_means = np.zeros_like(sums)
    raw_means[seen] = sums[seen] / counts[seen, None]
    means = np.tile(mu, (num_codes, 1))                                   # unseen codes: global mean
    means[seen] = (sums[seen] + tau * mu) / (counts[seen, None] + tau)
    cov = np.zeros((d, d))
    for sl in _chunks(n):
        x = h[sl].astype(np.float64) - raw_means[codes[sl]]               # [c, d]
        cov += x.T @ x
    cov /= n
    cov[np.diag_indices(d)] += 1e-6 * np.trace(cov) / d
    precision = scipy.linalg.cho_solve(scipy.linalg.cho_factor(cov), np.eye(d))
    precision = (precision + precision.T) / 2                             # exact symmetry
    return MahalanobisStats(means=means, precision=precision)


def mahalanobis_score(h, codes, stats: MahalanobisStats) -> np.ndarray:
    """Squared Mahalanobis distance (h - mu_code)^T P (h - mu_code) to the mean of each token's code, [n]."""
    h = _as_2d(h, "h")
    codes = _as_codes(codes, h.shape[0], stats.means.shape[0])
    out = np.empty(h.shape[0])
    for sl in _chunks(h.shape[0]):
        x = h[sl].astype(np.float64) - stats.means[codes[sl]]             # [c, d]
        out[sl] = np.einsum("nd,nd->n", x @ stats.precision, x)
    return out


# ----------------------------------------------------------------------------- KNN

@dataclass
class KNNStats:
    """A bank of L2-normalised healthy slice vectors for k-th nearest neighbour distance."""
    bank: np.ndarray    # [m, d] float32, unit rows
    k: int
    bins: np.ndarray    # [m] int64 axial position bin of each bank slice (all 0: no position)


def _normalise(x, name: str) -> np.ndarray:
    """Rows scaled to unit L2 norm in float64; zero rows (e.g. a slice without foreground) raise."""
    x = _as_2d(x, name).astype(np.float64)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    n_zero = int((norms == 0).sum())
    if n_zero:
        raise ValueError(f"{name} has {n_zero} zero vectors, which have no direction")
    return x / norms


def fit_knn(features, k: int = 5, bins=None) -> KNNStats:
    """Bank of pooled per-slice vectors [m, d] (healthy train slices), L2-normalised, searched for the k-th NN;
    `bins` [m]: the slices' axial position bins, for position-conditional search (knn_score)."""
    bank = _normalise(features, "features").astype(np.float32)
    if not 1 <= k <= bank.shape[0]:
        raise ValueError(f"k must be in [1, {bank.shape[0]}] (bank size), got {k}")
    bins = np.zeros(len(bank), np.int64) if bins is None else np.asarray(bins, dtype=np.int64)
    if bins.shape != (len(bank),):
        raise ValueError(f"bins must be [{len(bank)}], got {bins.shape}")
    return KNNStats(bank=bank, k=int(k), bins=bins)


def knn_score(features, stats: KNNStats, exclude_self: bool = False, bins=None, window: int = 1) -> np.ndarray:
    """Euclidean distance of each L2-normalised vector [n, d] to its k-th nearest bank vector, [n].

    Exact search: chunked float32 matmul of cosine similarities finds the neighbour, and its distance is then
    recomputed in float64 (so the result does not carry float32 cancellation in 2 - 2 cos). exclude_self=True
    skips one nearest neighbour, for scoring the bank's own vectors (whose nearest is itself at distance 0).
    bins [n] (the queries' axial position bins): only bank slices within `window` bins count, so that a slice
    near the top of the brain is compared with healthy slices near the top (a query with fewer than k of them
    falls back to the whole bank).
    """
    q = _normalise(features, "features")                                  # [n, d] float64
    m = stats.bank.shape[0]
    j = stats.k - 1 + int(exclude_self)                                   # 0-based neighbour rank
    if j >= m:
        raise ValueError(f"bank of {m} vectors has no neighbour of rank {j + 1}")
    if bins is not None:
        bins = np.asarray(bins, dtype=np.int64)
        if bins.shape != (q.shape[0],):
            raise ValueError(f"bins must be [{q.shape[0]}], got {bins.shape}")
    out = np.empty(q.shape[0])
    for sl in _chunks(q.shape[0], max(1, 2**24 // m)):                    # [c, m] float32 <= 64 MiB
        sims = q[sl].astype(np.float32) @ stats.bank.T                    # [c, m]
        if bins is not None:
            near = np.abs(bins[sl, None] - stats.bins[None, :]) <= window  # [c, m]
            enough = near.sum(axis=1) > j
            sims = np.where(near | ~enough[:, None], sims, -np.inf)
        idx = np.argpartition(-sims, j, axis=1)[:, j]                     # [c]
        out[sl] = np.linalg.norm(q[sl] - stats.bank[idx].astype(np.float64), axis=1)
    return out


# ----------------------------------------------------------------------------- logit scores

def _logit_rows(logits) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim < 1 or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [..., K] with K > 0, got shape {logits.shape}")
    return logits.reshape(-1, logits.shape[-1])


def _logsumexp_rows(logits) -> np.ndarray:
    """logsumexp over the last axis in float64, chunked, shape [...]."""
    flat = _logit_rows(logits)
    out = np.empty(flat.shape[0])
    for sl in _chunks(flat.shape[0]):
        out[sl] = logsumexp(flat[sl].astype(np.float64), axis=1)
    return out.reshape(np.shape(logits)[:-1])


def energy_score(logits) -> np.ndarray:
    """Negative energy -logsumexp(logits) over the last axis, [...]."""
    return -_logsumexp_rows(logits)


def max_logit_score(logits) -> np.ndarray:
    """Negative max logit over the last axis, [...]."""
    return -np.asarray(logits).max(axis=-1).astype(np.float64)


def nll_score(logits, codes) -> np.ndarray:
    """-log softmax(logits)[code], [...]: MIM-OOD's native score, the surprise of the observed code."""
    logits = np.asarray(logits)
    codes = np.asarray(codes)
    if codes.shape != logits.shape[:-1]:
        raise ValueError(f"codes {codes.shape} must match logits {logits.shape} without the last axis")
    flat_codes = _as_codes(codes.ravel(), codes.size, logits.shape[-1])           # [N]
    picked = np.take_along_axis(_logit_rows(logits), flat_codes[:, None], axis=1)  # [N, 1]
    return _logsumexp_rows(logits) - picked.astype(np.float64).reshape(codes.shape)


# ----------------------------------------------------------------------------- (de)serialisation

_KINDS = {cls.__name__: cls for cls in (ViMStats, MahalanobisStats, KNNStats)}
Stats = ViMStats | MahalanobisStats | KNNStats


def stats_to_tensors(stats: dict[str, Stats]) -> dict[str, np.ndarray]:
    """Flatten named stats into {"<name>/<class>/<field>": array} for safetensors; scalars become 0-d arrays."""
    out = {}
    for name, st in stats.items():
        if not name or "/" in name:
            raise ValueError(f"stats name must be non-empty without '/', got {name!r}")
        kind = type(st).__name__
        if kind not in _KINDS:
            raise ValueError(f"cannot store {kind}; known: {sorted(_KINDS)}")
        for f in fields(st):
            out[f"{name}/{kind}/{f.name}"] = np.array(getattr(st, f.name), order="C")   # 0-d stays 0-d
    return out


def stats_from_tensors(tensors: dict[str, np.ndarray]) -> dict[str, Stats]:
    """Inverse of stats_to_tensors: rebuild the named stats (0-d arrays back to Python scalars)."""
    grouped: dict[tuple[str, str], dict] = {}
    for key, value in tensors.items():
        parts = key.split("/")
        if len(parts) != 3 or parts[1] not in _KINDS:
            raise ValueError(f"unexpected stats key {key!r}")
        value = np.asarray(value)
        grouped.setdefault((parts[0], parts[1]), {})[parts[2]] = value.item() if value.ndim == 0 else value
    out = {}
    for (name, kind), values in grouped.items():
        expected = {f.name for f in fields(_KINDS[kind])}
        if set(values) != expected:
            raise ValueError(f"stats {name!r} ({kind}) has fields {sorted(values)}, expected {sorted(expected)}")
        out[name] = _KINDS[kind](**values)
    return out
