"""Shared test settings."""
import pytest
import torch


@pytest.fixture(autouse=True)
def torch_settings():
    """train() sets threads and deterministic algorithms process-wide; every test gets its own back."""
    threads, deterministic = torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()
    yield
    torch.set_num_threads(threads)
    torch.use_deterministic_algorithms(deterministic)
