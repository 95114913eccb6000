"""EM for CommVQ's RoPE-commuting codebooks (arXiv 2506.18879, §3.3), one residual stage
at a time.

Data: ``u [N, P, 2]``, unit-normalized (pre-RoPE) vectors as ``P`` complex pairs. A stage
is a table ``θ [K, P, 2]``; its ``K²`` codewords are ``c_{A,B} = θ_A + J θ_B`` with ``J`` the
90° rotation (multiplication by ``i``), so every codeword is a stack of complex numbers and
commutes with RoPE.

* E-step: distances ``d_{n,AB} = ||u_n - c_AB||`` and soft assignments ``w = softmax(-d/T)``
  over the ``K²`` codewords; the temperature anneals exponentially from ``t_start`` to
  ``t_end`` times the residual's RMS norm (the paper's 1e-3 → 1e-5 on vectors whose norm is
  about 0.35 and divides the temperature by 10 as the residual shrinks).
* M-step: the exact minimizer of ``Σ_n Σ_AB w_{n,AB} ||u_n - θ_A - Jθ_B||²`` over ``θ``.
  Setting the gradient to zero gives, for every pair ``j`` with the same ``2K × 2K``
  matrix ``G = diag(W1 + Wᵀ1) ⊗ I + W ⊗ J + Wᵀ ⊗ Jᵀ`` (``W_AB = Σ_n w_{n,AB}``):
  ``G θ_{:,j} = U_{:,j} + Jᵀ V_{:,j}``, where ``U_C = Σ_n (Σ_B w_{n,CB}) u_n`` and
  ``V_C = Σ_n (Σ_A w_{n,AC}) u_n`` — only ``K²`` counts and two ``[K, N] × [N, D]``
  products, never the ``K² × D`` means.

The stage with the lowest hard-assignment error is kept; EM stops once an iteration no
longer lowers it (each iteration's distances serve both its error and its E-step). Residuals then go to the next stage (greedy additive quantization).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

J = np.array([[0.0, -1.0], [1.0, 0.0]], dtype=np.float32)


@dataclass(frozen=True)
class EMSettings:
    """``steps``: EM iterations per stage (at most); temperatures relative to the residual."""

    steps: int = 12
    t_start: float = 3e-3
    t_end: float = 3e-5
    ridge: float = 1e-6


DEFAULT_EM = EMSettings()


def codewords_parts(theta: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``θ [K, P, 2]`` -> (``θ_A`` rows, ``Jθ_B`` rows), each ``[K, 2P]``."""
    k = theta.shape[0]
    return theta.reshape(k, -1), (theta @ J.T).reshape(k, -1)


def squared_distances(u: np.ndarray, theta: np.ndarray) -> np.ndarray:
    """``||u_n - c_AB||²`` for ``u [N, 2P]``: ``[N, K, K]`` via the split ``⟨u, c_AB⟩ =
    ⟨u, θ_A⟩ + ⟨u, Jθ_B⟩``."""
    a, b = codewords_parts(theta)
    sq = (a * a).sum(1)
    pair = sq[:, None] + sq[None, :] + 2 * (a @ b.T)  # ||c_AB||²
    f, g = u @ a.T, u @ b.T
    d2 = f[:, :, None] + g[:, None, :]  # in place from here: [N, K, K] is the big array
    d2 *= -2.0
    d2 += pair[None]
    d2 += (u * u).sum(1)[:, None, None]
    return np.maximum(d2, 0.0, out=d2)


def hard_assign(u: np.ndarray, theta: np.ndarray) -> tuple[np.ndarray, np.ndarray, float]:
    """Nearest codeword per row: (A [N], B [N], mean squared error per row)."""
    k = theta.shape[0]
    d2 = squared_distances(u, theta).reshape(len(u), k * k)
    best = d2.argmin(1)
    return best // k, best % k, float(d2[np.arange(len(u)), best].mean())


def m_step(u: np.ndarray, w: np.ndarray, ridge: float) -> np.ndarray:
    """Closed-form ``θ [K, P, 2]`` from soft assignments ``w [N, K, K]`` (module docstring)."""
    k = w.shape[1]
    p = u.shape[1] // 2
    big_w = w.sum(0)
    counts = big_w.sum(1) + big_w.sum(0)
    g = np.kron(np.diag(counts), np.eye(2)) + np.kron(big_w, J) + np.kron(big_w.T, J.T)
    g += ridge * max(counts.max(), 1.0) * np.eye(2 * k)
    up = (w.sum(2).T @ u).reshape(k, p, 2)
    vp = (w.sum(1).T @ u).reshape(k, p, 2)
    rhs = up + vp @ J  # Jᵀ v as a row-vector product: v @ J
    sol = np.linalg.solve(g.astype(np.float64), rhs.transpose(0, 2, 1).reshape(2 * k, p))
    return sol.reshape(k, 2, p).transpose(0, 2, 1).astype(np.float32)


def train_stage(
    u: np.ndarray, k: int, rng: np.random.Generator, settings: EMSettings = DEFAULT_EM
) -> tuple[np.ndarray, float]:
    """One stage's ``θ [K, P, 2]`` for residuals ``u [N, 2P]``; returns (θ, hard MSE)."""
    rms = float(np.sqrt((u * u).sum(1).mean())) or 1.0
    s = settings
    temps = s.t_start * rms * (s.t_end / s.t_start) ** np.linspace(0, 1, max(s.steps, 2))
    # start: K² random samples as unstructured centers, one soft E-step, one M-step
    centers = u[rng.integers(0, len(u), k * k)]
    d2 = (u * u).sum(1)[:, None] - 2 * u @ centers.T + (centers * centers).sum(1)[None]
    w = _softmax(np.sqrt(np.maximum(d2, 0)) / -temps[0])
    theta = m_step(u, w.reshape(len(u), k, k).astype(np.float32), s.ridge)
    best_theta, best = theta, np.inf
    for temperature in temps[: s.steps]:
        d2 = squared_distances(u, theta).reshape(len(u), k * k)  # one pass serves E and error
        err = float(d2.min(1).mean())
        if err >= best * (1 - 1e-4):
            break
        best_theta, best = theta, err
        logits = np.sqrt(d2, out=d2)
        logits /= -temperature
        theta = m_step(u, _softmax(logits).reshape(len(u), k, k), s.ridge)
    return best_theta, best


def _softmax(logits: np.ndarray) -> np.ndarray:
    logits -= logits.max(1, keepdims=True)
    w = np.exp(logits, out=logits)
    w /= w.sum(1, keepdims=True)
    return w


def train_tables(
    x: np.ndarray,
    stages: int,
    table_bits: int,
    *,
    seed: int = 0,
    settings: EMSettings = DEFAULT_EM,
) -> tuple[np.ndarray, list[float]]:
    """Residual stages for vectors ``x [N, D]`` in pair order (already de-rotated).

    Returns ``tables [R, K, P, 2]`` and the relative error ``E||u - û||² / E||u||²`` of
    the normalized vectors after each stage.
    """
    u = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-30)
    u = u.astype(np.float32)
    rng = np.random.default_rng(seed)
    k, p = 1 << table_bits, x.shape[1] // 2
    tables, errors = np.zeros((stages, k, p, 2), np.float32), []
    for r in range(stages):
        theta, _ = train_stage(u, k, rng, settings)
        ia, ib, _ = hard_assign(u, theta)
        a, b = codewords_parts(theta)
        u = u - a[ia] - b[ib]
        tables[r] = theta
        errors.append(float((u * u).sum(1).mean()))
    return tables, errors
