"""Where the maths runs: CUDA with bf16 when present, else the CPU in fp32 with one thread per physical core."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ownlm.errors import DeviceUnavailable


@dataclass(frozen=True)
class DeviceChoice:
    device: torch.device
    dtype: torch.dtype
    threads: int  # torch intra-op threads (CPU); informational on CUDA

    def describe(self) -> str:
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu"
        return f"{self.device} ({name}), {str(self.dtype).removeprefix('torch.')}, {self.threads} threads"


def physical_cores() -> int:
    """Physical cores of this machine (hyper-threads share a core's FPUs, so more threads only contend).

    Reads /proc/cpuinfo (Linux) because os.cpu_count() counts logical CPUs; falls back to the number of CPUs
    this process may run on.
    """
    try:
        allowed = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        allowed = os.cpu_count() or 1
    try:
        cores = set()
        phys = core = None
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, val = line.partition(":")
            key = key.strip()
            if key == "physical id":
                phys = val.strip()
            elif key == "core id":
                core = val.strip()
            elif not line.strip() and core is not None:
                cores.add((phys, core))
                phys = core = None
        if core is not None:
            cores.add((phys, core))
        if cores:
            return max(1, min(len(cores), allowed))
    except OSError:
        pass
    return max(1, allowed)


def select_device(preference: str = "auto", threads: int | None = None) -> DeviceChoice:
    """Pick the device for `preference` in {'auto', 'cpu', 'cuda'} and set torch's thread count."""
    n = threads or physical_cores()
    if preference == "cuda" and not torch.cuda.is_available():
        raise DeviceUnavailable(
            "--device cuda was asked for but no CUDA GPU is visible to torch",
            hint="use --device cpu (or auto), or install a CUDA build of torch on a GPU machine",
        )
    if preference in ("auto", "cuda") and torch.cuda.is_available():
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return DeviceChoice(torch.device("cuda"), dtype, n)
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return DeviceChoice(torch.device("cpu"), torch.float32, n)
