"""How train.sh launches on this machine: how many processes, and on which GPUs.

    python -m paddleocr_vl_manga.train.launch auto    # prints "NPROC VISIBLE GPU_GB DEVICES", e.g. "4 4 79 -"

One process per GPU, always: a single process that sees several GPUs gets wrapped in nn.DataParallel by the
Trainer (n_gpu = torch.cuda.device_count()), which splits pixel_values (every image's patches back to back)
across image boundaries and crashes at the first step. So NUM_GPUS=auto launches one torchrun process per
visible GPU, and NUM_GPUS=N with more visible hides the rest through CUDA_VISIBLE_DEVICES.

NPROC: processes to start on this node; VISIBLE: CUDA devices seen before any change; GPU_GB: total memory of
the first one (0 without a GPU); DEVICES: the CUDA_VISIBLE_DEVICES to set, "-" to leave it as it is.
A bad NUM_GPUS prints one `error:` line and exits 2.
"""

from __future__ import annotations

import os
import sys


class LaunchError(ValueError):
    pass


def plan_launch(num_gpus: str, visible: int, cuda_visible_devices: str | None) -> tuple[int, str | None]:
    """(processes, CUDA_VISIBLE_DEVICES to set or None to leave it) for NUM_GPUS on a node with `visible`
    CUDA devices; `cuda_visible_devices` is the variable as the user left it (None: unset)."""
    if num_gpus == "auto":
        return max(visible, 1), None  # no GPU: one CPU process
    if not num_gpus.isdigit() or int(num_gpus) < 1:
        raise LaunchError(f"NUM_GPUS must be auto or a number of processes >= 1, not {num_gpus!r}")
    n = int(num_gpus)
    if visible == 0:
        return n, None  # no GPU: N CPU processes (DDP over gloo), as the tests and the demo run it
    if n > visible:
        where = f" (CUDA_VISIBLE_DEVICES={cuda_visible_devices})" if cuda_visible_devices is not None else ""
        raise LaunchError(f"NUM_GPUS={n} but only {visible} GPU(s) are visible{where}; use NUM_GPUS=auto or "
                          f"NUM_GPUS={visible} or fewer")
    if n == visible:
        return n, None  # exactly what the user made visible: leave it alone
    # The first N of what is visible. CUDA stops at the first invalid entry, so the valid ones are a prefix
    # and the first N entries (indices, UUIDs or MIG ids) are the first N devices.
    if cuda_visible_devices is None:
        return n, ",".join(str(i) for i in range(n))
    return n, ",".join(d.strip() for d in cuda_visible_devices.split(",")[:n])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) != 1:
        print("usage: python -m paddleocr_vl_manga.train.launch auto|N", file=sys.stderr)
        return 2
    import torch

    visible = torch.cuda.device_count() if torch.cuda.is_available() else 0
    try:
        nproc, devices = plan_launch(argv[0], visible, os.environ.get("CUDA_VISIBLE_DEVICES"))
    except LaunchError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    gpu_gb = torch.cuda.get_device_properties(0).total_memory // 2**30 if visible else 0
    print(nproc, visible, gpu_gb, devices or "-")
    return 0


if __name__ == "__main__":
    sys.exit(main())
