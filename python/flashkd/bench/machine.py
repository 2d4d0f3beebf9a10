"""The machine a run measures: which device, what it is, its cache size, and
its copy bandwidth measured in the same run (the physical floor's denominator,
so floors track the machine as found rather than a datasheet)."""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
from importlib import metadata
from pathlib import Path

import torch

import flashkd

from .memory import cpu_method
from .timing import Budget, time_calls

_COPY_BYTES = {"cpu": 256 << 20, "cuda": 1 << 30}
_CPU_CACHE_FALLBACK = 32 << 20


def resolve_device(name):
    """"auto" picks CUDA when present; asking for CUDA without it is an error."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device")
    if name not in ("cpu", "cuda"):
        raise SystemExit(f"--device must be auto, cpu or cuda, got {name!r}")
    return torch.device(name)


def cache_bytes(device):
    """L2 on a GPU, the last-level cache on a CPU: inputs rotate past this."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).L2_cache_size
    sizes = []
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        text = (index / "size").read_text().strip()
        unit = {"K": 1 << 10, "M": 1 << 20}.get(text[-1], 1)
        sizes.append(int(text.rstrip("KM")) * unit)
    return max(sizes, default=_CPU_CACHE_FALLBACK)


def copy_bandwidth(device):
    """Bytes per second of a large device-to-device copy, counting bytes read
    plus bytes written (random data; the destination is touched beforehand)."""
    n = _COPY_BYTES[device.type] // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src).copy_(src)
    timing = time_calls(lambda i: dst.copy_(src), lambda i: None, device,
                        Budget(reps=None if device.type == "cuda" else 5))
    return 2 * src.nbytes / (timing.median_ms / 1e3)


def _device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git(*args):
    source = Path(flashkd.__file__).resolve().parent
    try:
        return subprocess.run(["git", *args], cwd=source, capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None


def _version(package):
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def describe(device, bandwidth):
    """Everything a result file needs to be read later without guessing."""
    commit = _git("rev-parse", "HEAD") or os.environ.get("FLASHKD_COMMIT", "unknown")
    # Results files written earlier in the same session do not make the code dirty.
    status = _git("status", "--porcelain", "--untracked-files=no", "--", ":(top)", ":(top,exclude)bench/results")
    info = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device.type,
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "flashkd": flashkd.__version__,
        "commit": commit,
        "dirty": bool(status) if status is not None else None,
        "cpu_isa": flashkd.cpu_isa(),
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "liger_kernel": _version("liger-kernel"),
        "cut_cross_entropy": _version("cut-cross-entropy"),
        "copy_bandwidth_gbs": bandwidth / 1e9,
        "memory_method": "torch.cuda.max_memory_allocated" if device.type == "cuda" else cpu_method(),
    }
    if device.type == "cuda":
        info["cuda"] = torch.version.cuda
        info["flashkd_cuda_kernels"] = flashkd.has_cuda_kernels()
    return info
