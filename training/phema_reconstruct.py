"""Post-hoc EMA reconstruction (EDM2 §3.2, Alg. 3) from a run's snapshots: which snapshots, the least-squares fit
of their EMA profiles to the wanted one, and the weighted sums of their weights. reconstruct_phema.py and the Python
API (training/api.py) call it."""

import copy
import glob
import os
from collections.abc import Iterator

import numpy as np
import torch

import dnnlib
from training import phema
from training.snapshots import load_network_pickle, parse_snapshot_name


class PhemaError(Exception):
    """A reconstruction that cannot be done as asked; the message is one sentence for the user."""


def parse_std_list(s: str) -> list[float]:
    """'0.050,0.100' or '0.010,0.015,...,0.250' (the step comes from the two values before '...')."""
    tokens = [t.strip() for t in s.split(',')]
    if '' in tokens:
        raise ValueError(f'{s!r} has an empty item; separate the stds by single commas, e.g. 0.050,0.100')
    stds: list[float] = []
    for idx, tok in enumerate(tokens):
        if tok != '...':
            try:
                stds.append(float(tok))
            except ValueError:
                raise ValueError(f'{tok!r} is not a number') from None
            continue
        if idx < 2 or '...' in tokens[idx - 2 : idx] or idx + 1 >= len(tokens) or tokens[idx + 1] == '...':
            raise ValueError("'...' needs two values before it and one after it, e.g. 0.010,0.015,...,0.250")
        step, end = stds[-1] - stds[-2], float(tokens[idx + 1])
        num = (end - stds[-1]) / step if step != 0 else -1
        if num < 0 or abs(num - round(num)) > 1e-6:
            raise ValueError(f'{end} is not reached from {stds[-1]} in steps of {step:g}')
        start = stds[-1]
        stds += [round(start + k * step, 9) for k in range(1, round(num))]  # the end value follows as a token
    names: dict[str, float] = {}
    for std in stds:
        phema.std_to_exp(std)  # raises for a std no power-function profile has
        if f'{std:.3f}' in names:
            raise ValueError(f'stds {names[f"{std:.3f}"]} and {std} give the same file name; list each std once')
        names[f'{std:.3f}'] = std
    return stds


def list_snapshots(indir: str, exclude_prefix: str | None = None) -> list[str]:
    """Snapshots `*-{kimg:07d}-{std:.3f}.pkl` in `indir`, oldest first (earlier outputs excluded); a .safetensors
    file replaces the pickle of the same name (it loads without running code)."""
    if os.path.isfile(indir):
        raise PhemaError(f'--indir={indir} is a file; name the folder of the training snapshots.')
    if not os.path.isdir(indir):
        raise PhemaError(f'Input folder not found: {indir}')
    found, excluded = [], False
    paths = glob.glob(os.path.join(indir, '*.safetensors'))
    paths += [p for p in glob.glob(os.path.join(indir, '*.pkl')) if f'{p[:-4]}.safetensors' not in paths]
    for path in paths:
        try:
            prefix, kimg, std = parse_snapshot_name(path)
        except ValueError:
            continue
        if prefix != exclude_prefix:
            found.append((kimg, std, path))
        excluded |= prefix == exclude_prefix
    if not found and excluded:
        raise PhemaError(
            f'The snapshots in {indir} are named {exclude_prefix}-KIMG-STD, as the outputs would be; give '
            f'--outprefix another prefix, e.g. phema.'
        )
    if not found:
        raise PhemaError(
            f'No snapshots named PREFIX-KIMG-STD.pkl (e.g. network-snapshot-0008388-0.050.pkl) found in {indir}'
        )
    return [path for _kimg, _std, path in sorted(found)]


# Relative L2 error ‖Σ x_i p_i − p_target‖ / ‖p_target‖ of the reconstructed profiles, from the Gram matrix.
def profile_errors(in_kimg, in_std, out_kimg, out_std, coefs: np.ndarray) -> np.ndarray:
    in_kimg, in_std = np.asarray(in_kimg, np.float64), np.asarray(in_std, np.float64)
    out_kimg, out_std = np.broadcast_arrays(np.asarray(out_kimg, np.float64), np.asarray(out_std, np.float64))
    use = in_kimg > 0
    x = coefs[use]
    A = phema.power_function_correlation(in_kimg[use, None], in_std[use, None], in_kimg[None, use], in_std[None, use])
    b = phema.power_function_correlation(in_kimg[use, None], in_std[use, None], out_kimg[None], out_std[None])
    pp = phema.power_function_correlation(out_kimg, out_std, out_kimg, out_std)
    sq = pp - 2 * np.sum(x * b, axis=0) + np.sum(x * (A @ x), axis=0)
    return np.sqrt(np.maximum(sq, 0) / pp)


def _check_fit(
    in_kimg: list[int], in_std: list[float], out_kimg: int, out_std: list[float], coefs: np.ndarray, max_error: float
) -> None:
    errors = profile_errors(in_kimg, in_std, out_kimg, out_std, coefs)
    bad = [
        (std, err) for j, (std, err) in enumerate(zip(out_std, errors)) if not (err <= max_error and coefs[:, j].any())
    ]
    if not bad:
        return
    std, err = bad[0]
    usable = [k for k in in_kimg if 0 < k <= out_kimg]
    if not usable:
        why = f'no snapshot lies in 0 < kimg <= {out_kimg} (the oldest is at kimg {min(in_kimg)})'
    elif out_kimg > max(usable):
        why = (
            f'kimg {out_kimg} is past the newest usable snapshot (kimg {max(usable)}), and an EMA cannot be '
            f'extended beyond its last snapshot'
        )
    else:
        why = (
            f'{len(usable)} snapshots up to kimg {out_kimg} cannot form that profile (tracked stds: '
            f'{", ".join(f"{s:.3f}" for s in sorted(set(in_std)))}); use more snapshots or a std nearer the tracked ones'
        )
    raise PhemaError(
        f'Cannot reconstruct std {std:.3f} at kimg {out_kimg}: the least-squares fit leaves a relative '
        f'profile error of {err:.3f} > --max-error {max_error:g}, because {why}.'
    )


def _arch_signature(net: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(t.shape) for name, t in [*net.named_parameters(), *net.named_buffers()]}


def _check_same_arch(ref: tuple[str, dict], path: str, sig: dict) -> None:
    ref_path, ref_sig = ref
    if sig == ref_sig:
        return
    names = sorted(set(ref_sig) ^ set(sig)) or sorted(n for n in sig if sig[n] != ref_sig[n])
    name = names[0]
    detail = f'{name!r} is {ref_sig.get(name, "missing")} vs {sig.get(name, "missing")}'
    raise PhemaError(
        f'Snapshots {ref_path} and {path} hold different architectures ({detail}); '
        f'reconstruct from the snapshots of one run only.'
    )


def reconstruct_phema(
    in_pkls: list[str],
    out_std: list[float],
    out_kimg: int,
    batch_size: int = 8,
    max_error: float = 0.1,
    verbose: bool = False,
) -> Iterator[tuple[float, dict]]:
    """Yield (std, snapshot dict) for each std in `out_std`, the EMA at `out_kimg` rebuilt from `in_pkls`.

    Inputs are streamed one at a time; each pass over them builds `batch_size` outputs, accumulated in
    float32 and stored in the inputs' dtype. The other dict entries come from the newest input used.
    """
    if out_kimg <= 0:
        raise PhemaError(f'The output kimg must be positive, got {out_kimg}; post-hoc EMA needs some training.')
    if batch_size <= 0:
        raise PhemaError(f'The batch size must be positive, got {batch_size}.')
    inputs = []
    for path in in_pkls:
        try:
            _prefix, kimg, std = parse_snapshot_name(path)
        except ValueError as e:
            raise PhemaError(str(e)) from None
        inputs.append((kimg, std, path))
    inputs.sort()
    for (k0, s0, p0), (k1, s1, p1) in zip(inputs, inputs[1:]):
        if (k0, f'{s0:.3f}') == (k1, f'{s1:.3f}'):
            raise PhemaError(f'Snapshots {p0} and {p1} have the same kimg and std; keep the snapshots of one run only.')
    in_kimg, in_std, in_path = [k for k, _, _ in inputs], [s for _, s, _ in inputs], [p for _, _, p in inputs]
    out_std = list(out_std)
    coefs = phema.solve_posthoc_coefficients(in_kimg, in_std, out_kimg, out_std)
    _check_fit(in_kimg, in_std, out_kimg, out_std, coefs, max_error)

    batches = [list(range(i, min(i + batch_size, len(out_std)))) for i in range(0, len(out_std), batch_size)]
    uses = [[i for i in range(len(inputs)) if np.any(coefs[i, cols] != 0)] for cols in batches]
    ref = None
    with dnnlib.util.progress_bar(
        total=sum(map(len, uses)), unit='pkl', desc='Reconstructing', disable=not verbose
    ) as bar:
        for cols, use in zip(batches, uses):
            outs: list[torch.nn.Module | None] = [None] * len(cols)
            for i in use:
                data = load_network_pickle(in_path[i])
                net = data['ema']
                if not isinstance(net, torch.nn.Module):
                    raise PhemaError(f"{in_path[i]} holds no torch network under 'ema'.")
                sig = _arch_signature(net)
                ref = ref or (in_path[i], sig)
                _check_same_arch(ref, in_path[i], sig)
                for k, j in enumerate(cols):
                    if outs[k] is None:
                        outs[k] = _float32_zeros_like(net)
                    _accumulate(outs[k], net, coefs[i, j])
                dtypes = [p.dtype for p in net.parameters()]
                newest = {key: value for key, value in data.items() if key != 'ema'}, list(data)
                del data, net  # at most one input net alive at a time
                bar.update(1)
            extras, keys = newest
            for k, j in enumerate(cols):
                out, outs[k] = outs[k], None
                for p, dtype in zip(out.parameters(), dtypes):
                    p.data = p.data.to(dtype)
                yield out_std[j], {key: out if key == 'ema' else extras[key] for key in keys}
                del out


@torch.no_grad()
def _float32_zeros_like(net: torch.nn.Module) -> torch.nn.Module:
    out = copy.deepcopy(net).eval().requires_grad_(False)
    for p in out.parameters():
        p.data = torch.zeros(p.shape, dtype=torch.float32, device=p.device)
    return out


# θ_out += x_i · θ_i for parameters; buffers are taken from the input (the newest input wins).
@torch.no_grad()
def _accumulate(out: torch.nn.Module, net: torch.nn.Module, coef: float) -> None:
    for p_out, p_in in zip(out.parameters(), net.parameters()):
        p_out.add_(p_in.to(torch.float32), alpha=float(coef))
    for b_out, b_in in zip(out.buffers(), net.buffers()):
        b_out.copy_(b_in)
