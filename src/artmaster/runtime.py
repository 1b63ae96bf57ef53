"""Torch on the CPU, the same on every machine: fixed kernels, fixed threads, deterministic ops.

The same float sum gives other bits when it is vectorised another way (AVX-512 vs AVX2 kernels in
ATen, MKL and oneDNN) or split between another number of threads; a training run amplifies such
a difference into another adapter, as another seed would. So:

- before torch loads (`pin_cpu_kernels`, called when the artmaster package is imported), the
  CPU kernels are pinned to code paths every x86-64 machine with AVX2 runs alike: ATen's AVX2
  kernels (ATEN_CPU_CAPABILITY), MKL's conditional numerical reproducibility on its branch for
  "Intel and compatible" processors (MKL_CBWR; a plain AVX2 branch is not honoured on AMD), and
  oneDNN's AVX2 kernels (ONEDNN_MAX_CPU_ISA). Values already in the environment win, and
  ARTMASTER_CPU_KERNELS=native keeps the machine's own kernels (faster, not portable);
- each stage fixes the thread count of torch and of numpy's BLAS and turns on deterministic
  algorithms (`apply`, `runtime` config group).
docs/reproducibility.md has what this costs and what it was checked against.
"""

from __future__ import annotations

import os
import platform

PORTABLE_KERNELS = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}


def pin_cpu_kernels() -> None:
    if os.environ.get("ARTMASTER_CPU_KERNELS", "portable") == "native":
        return
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return
    for name, value in PORTABLE_KERNELS.items():
        os.environ.setdefault(name, value)


def apply(runtime, uses_torch: bool = True) -> None:
    """The `runtime` config group: the CPU threads of torch and of numpy's BLAS (the style metric's
    matrix products), and deterministic algorithms. A stage that never runs torch skips torch's
    settings (importing torch and its deterministic mode costs about 4 s a process)."""
    from threadpoolctl import threadpool_limits

    threads = runtime.get("torch_threads")
    if threads:
        threadpool_limits(limits=int(threads), user_api="blas")  # until the process ends
    if not uses_torch:
        return
    import torch

    if threads:
        torch.set_num_threads(int(threads))
    if runtime.get("deterministic"):
        torch.use_deterministic_algorithms(True, warn_only=True)


def describe() -> dict:
    """What a result was computed with: CPU, the kernels in use and the thread count."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    return {"cpu": cpu, "aten_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "mkl_cbwr": os.environ.get("MKL_CBWR", ""), "onednn_max_cpu_isa": os.environ.get("ONEDNN_MAX_CPU_ISA", ""),
            "torch_threads": torch.get_num_threads(), "torch": torch.__version__}
