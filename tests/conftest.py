import pytest
import torch

from thermokfac.experiments import denormals

# as thermokfac's commands do: before any parallel work, so every worker thread copies it
denormals.request(True)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    yield
