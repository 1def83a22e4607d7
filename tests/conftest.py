import pytest
import torch

# Small tensors everywhere: extra threads only add contention on a 2-core machine.
torch.set_num_threads(1)


@pytest.fixture
def float64():
    """Run a test in float64 (maths checks), restoring the default afterwards."""
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)
