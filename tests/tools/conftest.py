"""Setup shared by the model tools tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread() -> Iterator[None]:
    """Torch on one thread while the tools tests run.

    Their models are tiny, so a second thread gains nothing, and while another process holds
    one of a 2-core machine's cores it turns each small op into a wait: 8 greedy runs of a
    2-layer model took 11-22 s on two threads and 0.7 s on one.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
