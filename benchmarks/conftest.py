"""Benchmark session setup: device, rows and the copy-bandwidth ceiling measured once per run."""
import os

import pytest
import torch

from common import copy_bandwidth_gbs


@pytest.fixture(scope="session")
def device() -> str:
    return os.environ.get("TCSM_BENCH_DEVICE", "cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture
def ceiling_gbs(device) -> float:
    """The machine's copy bandwidth (read + write), measured right before each benchmark: on a
    shared machine the bandwidth drifts within a run, and the fraction of it an op achieves is
    only meaningful against a ceiling measured under the same load."""
    return copy_bandwidth_gbs(device=device)


def available_bytes(device: str) -> int:
    if device == "cuda":
        free, _ = torch.cuda.mem_get_info()
        return free
    with open("/proc/meminfo") as info:
        fields = dict(line.split(":", 1) for line in info)
    return int(fields["MemAvailable"].split()[0]) * 1024
