"""Tests run on tiny nets and data; one torch thread each keeps the 2-core machine responsive."""

from __future__ import annotations

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)
