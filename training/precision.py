"""Compute precision, TF32 and torch.compile choices of a run, decided in one place for training, sampling and the
benchmarks.

Mixed precision follows EDM2: the master weights, the EMA (power-function EMA) accumulation, the forced weight
normalisation and the loss stay in float32; only the network's activations and the weights it uses are cast
(`Precond(use_fp16=...)`). fp16 is EDM2's CUDA mode (with loss scaling, --ls); bf16 needs no loss scaling and
also runs on CPUs with bf16 instructions.
"""

import os

import torch

PRECISIONS = ('fp32', 'fp16', 'bf16')


class PrecisionError(ValueError):
    """Contradicting or unknown precision options; the message is one sentence for the user."""


def cpu_has_bf16(cpuinfo: str = '/proc/cpuinfo') -> bool:
    """Whether this CPU has bf16 matrix instructions (AVX512-BF16 or AMX-BF16), where bf16 training pays: on a
    Xeon with AMX 1.3-2x the fp32 rate, on an AMD EPYC with AVX512-BF16 alone 1.1-2x (docs/benchmarks.md).
    Linux only; elsewhere False."""
    try:
        with open(cpuinfo) as f:
            flags = set(f.read().split())
    except OSError:
        return False
    return bool(flags & {'avx512_bf16', 'amx_bf16'})


def auto_precision(device: torch.device | str) -> str:
    """The default where none is given: fp16 on CUDA (EDM2's mode; bf16 is there for the asking), bf16 on a CPU
    with bf16 instructions (cpu_has_bf16; the same loss curve as fp32: docs/benchmarks.md), else fp32."""
    device = torch.device(device)
    if device.type == 'cuda':
        return 'fp16'
    if device.type == 'cpu' and cpu_has_bf16():
        return 'bf16'
    return 'fp32'


def resolve_precision(
    precision: str | None,
    fp16: bool | None = None,
    bf16: bool | None = None,
    device: torch.device | str = 'cpu',
) -> str:
    """'fp32', 'fp16' or 'bf16' from --precision and EDM2's --fp16 / the older --bf16 (aliases: --fp16=True is
    fp16, --fp16=False fp32, --bf16=True bf16); with none of them, auto_precision(device)."""
    if precision is not None and precision not in PRECISIONS:
        raise PrecisionError(f'--precision={precision}: choose one of {", ".join(PRECISIONS)}.')
    legacy = 'bf16' if bf16 else {True: 'fp16', False: 'fp32', None: None}[fp16]
    if bf16 and fp16:
        raise PrecisionError('--fp16=True and --bf16=True contradict each other; give --precision=fp16 or bf16.')
    if precision is not None and legacy is not None and legacy != precision:
        raise PrecisionError(f'--precision={precision} contradicts --fp16/--bf16 ({legacy}); give only --precision.')
    return precision or legacy or auto_precision(device)


def use_fp16_of(precision: str) -> bool | str:
    """Precond's `use_fp16` value of a precision: False, True (fp16) or 'bf16'."""
    return {'fp32': False, 'fp16': True, 'bf16': 'bf16'}[precision]


def precision_of(use_fp16: bool | str) -> str:
    """The inverse of use_fp16_of. fp16 computes in fp16 on CUDA only (EDM2), fp32 elsewhere."""
    return {False: 'fp32', True: 'fp16', 'fp16': 'fp16', 'bf16': 'bf16'}[use_fp16]


def set_tf32(allow: bool) -> None:
    """TF32 matmuls and convolutions on Ampere and newer GPUs: off unless asked for, as EDM2 does, so that fp32
    means fp32 (PyTorch's own default leaves it on for cuDNN convolutions)."""
    torch.backends.cuda.matmul.allow_tf32 = allow
    torch.backends.cudnn.allow_tf32 = allow


def compile_module(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`module`, compiled with torch.compile (fixed shapes: one compile per resolution and batch) when enabled.
    Off by default: on CPU the compile costs tens of seconds to minutes and the demo step gains ~10 %, which pays
    only in runs of several minutes; see docs/benchmarks.md. EDM2X_COMPILE_MODE picks a mode (e.g. max-autotune)."""
    if enabled:
        # In place (Module.compile): state-dict keys, DDP wrapping and pickles stay those of the plain module.
        module.compile(dynamic=False, mode=os.environ.get('EDM2X_COMPILE_MODE') or None)
    return module


def prepare_for_sampling(net: torch.nn.Module, precision: str | None = None, compile: bool = False) -> None:
    """Set a loaded denoiser's compute precision (None: as pickled) and compile it, in place. The precision is
    `use_fp16` of every module that has one (Precond, DiT and the DDPM nets, guided or wrapped nets included); a
    net without one runs fp32 only."""
    if precision is not None:
        if precision not in PRECISIONS:
            raise PrecisionError(f'--precision={precision}: choose one of {", ".join(PRECISIONS)}.')
        preconds = [m for m in net.modules() if hasattr(m, 'use_fp16')]
        if not preconds and precision != 'fp32':
            raise PrecisionError(f'--precision={precision}: this network ({type(net).__name__}) computes in fp32 only.')
        for m in preconds:
            m.use_fp16 = use_fp16_of(precision)
    compile_module(net, compile)
