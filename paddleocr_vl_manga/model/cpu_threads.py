"""How many intra-op threads CPU inference uses: the physical cores, unless the user chose.

PyTorch starts with one thread per logical CPU it may run on (OpenMP's default), so on a machine with SMT
(2 logical CPUs per core) a GEMM-bound forward runs two threads per core's vector units, which gains nothing
and loses to their contention. Inference on the CPU (model.loading.load_for_inference) therefore sets
torch's threads to physical_cores(), except where the user already decided: OMP_NUM_THREADS in the
environment, or torch.set_num_threads(k) called with k other than torch's own default.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import torch

CGROUP_CPU_MAX = Path("/sys/fs/cgroup/cpu.max")  # cgroup v2: "QUOTA PERIOD" or "max PERIOD" (docker --cpus)


def cpu_quota() -> int | None:
    """The CPUs' worth of time a cgroup quota allows this process (rounded up), or None without a quota."""
    try:
        quota, period = CGROUP_CPU_MAX.read_text().split()[:2]
        return None if quota == "max" else max(1, math.ceil(int(quota) / int(period)))
    except (OSError, ValueError, ZeroDivisionError):
        return None


def physical_cores() -> int:
    """Physical cores among the CPUs this process may run on (its affinity mask: taskset and cpusets count),
    at most its cgroup's CPU quota (cpu.max: docker --cpus; threads past it only wait for the CFS throttle).

    /proc/cpuinfo pairs each logical CPU with its (physical id, core id); where it lacks them (some ARM
    kernels, non-Linux) every allowed logical CPU counts.
    """
    try:
        allowed = os.sched_getaffinity(0)
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1
    try:
        blocks = Path("/proc/cpuinfo").read_text().strip().split("\n\n")
    except OSError:
        return min(len(allowed), cpu_quota() or len(allowed))
    cores = set()
    for block in blocks:
        pairs = (line.partition(":") for line in block.splitlines())
        info = {k.strip(): v.strip() for k, _, v in pairs}
        if "core id" in info and info.get("processor", "").isdigit() and int(info["processor"]) in allowed:
            cores.add((info.get("physical id"), info["core id"]))
    return min(len(cores) or len(allowed), cpu_quota() or len(allowed))


def torch_default_threads() -> int:
    """The thread count torch picks by itself: one per logical CPU this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def use_physical_cores() -> int:
    """Set torch's intra-op threads to the physical cores unless the user chose a count; return the count.

    The user chose when OMP_NUM_THREADS is set or torch.get_num_threads() is not torch's own default."""
    if os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads() != torch_default_threads():
        return torch.get_num_threads()
    torch.set_num_threads(physical_cores())
    return torch.get_num_threads()
