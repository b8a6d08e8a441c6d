"""Power-function EMA and post-hoc EMA reconstruction (EDM2 §3 and Appendix C).

Training time is measured in images. A power-function profile (t, γ) averages the parameters seen
over [0, t] with weights ∝ τ^γ; its width is given by the relative standard deviation σ_rel ("std").
"""

import copy
import functools

import numpy as np
import torch


# σ_rel -> γ: largest real root of γ³ + 7γ² + (16 − σ⁻²)γ + (12 − σ⁻²) = 0 (EDM2 Alg. 2).
@functools.lru_cache(maxsize=1024)  # the EMA asks for the same few stds at every training step
def _std_to_exp_scalar(std: float) -> float:
    if not std > 0:
        raise ValueError(f'EMA std must be positive, got {std}')
    roots = np.roots([1, 7, 16 - std**-2, 12 - std**-2])
    real = roots.real[np.abs(roots.imag) <= 1e-9 * np.maximum(np.abs(roots.real), 1)]
    if len(real) == 0 or real.max() <= -1:
        raise ValueError(f'EMA std {std} is wider than any power-function profile allows (max ~0.2996)')
    return float(real.max())


def std_to_exp(std: float | np.ndarray) -> float | np.ndarray:
    std = np.asarray(std, dtype=np.float64)
    exps = np.vectorize(_std_to_exp_scalar, otypes=[np.float64])(std.ravel()).reshape(std.shape)
    return float(exps) if exps.ndim == 0 else exps


# γ -> σ_rel = sqrt((γ+1) / ((γ+2)² (γ+3))) (EDM2 Eq. 3).
def exp_to_std(exp: float | np.ndarray) -> float | np.ndarray:
    exp = np.asarray(exp, dtype=np.float64)
    std = np.sqrt((exp + 1) / ((exp + 2) ** 2 * (exp + 3)))
    return float(std) if std.ndim == 0 else std


# EMA decay for a step from t_next − t_delta to t_next: β = (1 − Δt/t)^(γ+1) (EDM2 Eq. 4).
def power_function_beta(std: float, t_next: float, t_delta: float) -> float:
    return float((1 - t_delta / t_next) ** (std_to_exp(std) + 1))


# Inner product of two unit-mass power profiles (EDM2 Alg. 3); ofs = end time t, any order.
def power_function_correlation(a_ofs, a_std, b_ofs, b_std) -> np.ndarray:
    a_ofs, b_ofs = np.asarray(a_ofs, dtype=np.float64), np.asarray(b_ofs, dtype=np.float64)
    a_exp, b_exp = np.asarray(std_to_exp(a_std)), np.asarray(std_to_exp(b_std))
    swap = a_ofs > b_ofs  # the formula needs t_a <= t_b; the inner product is symmetric
    t_a, t_b = np.where(swap, b_ofs, a_ofs), np.where(swap, a_ofs, b_ofs)
    g_a, g_b = np.where(swap, b_exp, a_exp), np.where(swap, a_exp, b_exp)
    return (g_a + 1) * (g_b + 1) * (t_a / t_b) ** g_b / ((g_a + g_b + 1) * t_b)


# Least-squares weights x with Σ_i x_i p_i ≈ p_target, from A x = b (EDM2 Alg. 3).
def solve_posthoc_coefficients(in_ofs, in_std, out_ofs, out_std) -> np.ndarray:
    in_ofs, in_std = np.broadcast_arrays(np.asarray(in_ofs, np.float64).ravel(), np.asarray(in_std, np.float64).ravel())
    out_ofs, out_std = np.broadcast_arrays(
        np.asarray(out_ofs, np.float64).ravel(), np.asarray(out_std, np.float64).ravel()
    )
    coefs = np.zeros([len(in_ofs), len(out_ofs)], dtype=np.float64)
    for j, (t_out, s_out) in enumerate(zip(out_ofs, out_std)):
        use = np.flatnonzero((in_ofs > 0) & (in_ofs <= t_out))  # only snapshots up to the target take part
        if len(use) == 0:
            continue
        A = power_function_correlation(in_ofs[use, None], in_std[use, None], in_ofs[None, use], in_std[None, use])
        b = power_function_correlation(in_ofs[use], in_std[use], t_out, s_out)
        coefs[use, j] = np.linalg.lstsq(A, b, rcond=None)[0]
    return coefs


class PowerFunctionEMA:
    """Tracks one power-function EMA of `net` per std (EDM2 §3.1); time is the number of images seen.

    `betas`: classic EMAs with a constant decay per optimiser step tracked beside them (DiT's 0.9999,
    Peebles & Xie 2023): ema ← β·ema + (1 − β)·net after every step. `get()` returns the power-function
    EMAs only (post-hoc reconstruction and the sample grids use them); `classic()` the others."""

    def __init__(self, net: torch.nn.Module, stds: list[float] = [0.050, 0.100], betas: list[float] = []) -> None:
        self.net = net
        self.stds = list(stds)
        self.betas = list(betas)
        if any(not 0 <= beta < 1 for beta in self.betas):
            raise ValueError(f'EMA decays must lie in [0, 1), got {self.betas}')
        self.emas = [copy.deepcopy(net).eval().requires_grad_(False) for _ in self.stds + self.betas]

    @torch.no_grad()
    def reset(self) -> None:
        for ema in self.emas:
            for p_ema, p_net in zip(ema.parameters(), self.net.parameters()):
                p_ema.copy_(p_net)
            for b_ema, b_net in zip(ema.buffers(), self.net.buffers()):
                b_ema.copy_(b_net)

    @torch.no_grad()
    def update(self, cur_nimg: int, batch_size: int) -> None:
        """Fold in the net after a step that brought the images seen to `cur_nimg`."""
        decays = [power_function_beta(std=std, t_next=cur_nimg, t_delta=batch_size) for std in self.stds]
        for beta, ema in zip(decays + self.betas, self.emas):
            for p_ema, p_net in zip(ema.parameters(), self.net.parameters()):
                p_ema.lerp_(p_net.detach().to(p_ema.dtype), 1 - beta)
            for b_ema, b_net in zip(ema.buffers(), self.net.buffers()):
                b_ema.copy_(b_net)

    def get(self) -> list[tuple[torch.nn.Module, float]]:
        return list(zip(self.emas, self.stds))

    def classic(self) -> list[tuple[torch.nn.Module, float]]:
        return list(zip(self.emas[len(self.stds) :], self.betas))

    def state_dict(self) -> dict:
        return dict(stds=list(self.stds), betas=list(self.betas), emas=[ema.state_dict() for ema in self.emas])

    def load_state_dict(self, state: dict) -> None:
        """Checkpoints written before classic EMAs existed hold none (`betas` missing: [])."""
        if [round(s, 6) for s in state['stds']] != [round(s, 6) for s in self.stds]:
            raise ValueError(f'EMA state tracks stds {state["stds"]}, but this run tracks {self.stds}')
        if [round(b, 9) for b in state.get('betas', [])] != [round(b, 9) for b in self.betas]:
            raise ValueError(f'EMA state tracks decays {state.get("betas", [])}, but this run tracks {self.betas}')
        for ema, ema_state in zip(self.emas, state['emas']):
            ema.load_state_dict(ema_state)
