import os

import pytest
import torch

from ownlm.device import physical_cores, select_device
from ownlm.errors import DeviceUnavailable


def test_physical_cores_within_logical_cpus():
    assert 1 <= physical_cores() <= (os.cpu_count() or 1)


def test_cpu_selection_sets_threads():
    d = select_device("cpu", threads=1)
    assert d.device.type == "cpu" and d.dtype == torch.float32 and d.threads == 1
    assert torch.get_num_threads() == 1
    select_device("cpu")  # restore the default: physical cores
    assert torch.get_num_threads() == physical_cores()


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_gpu():
    with pytest.raises(DeviceUnavailable, match="cuda"):
        select_device("cuda")
    assert select_device("auto").device.type == "cpu"
