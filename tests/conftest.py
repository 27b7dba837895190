"""Shared test set-up: offline hub, one thread, fixtures for tiny shapes worlds."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def parity_fixtures_dir():
    """The recorded detectron2 outputs (DESIGN §7); tests skip with a reason where they are absent."""
    from pathlib import Path

    root = Path(os.environ.get("OVD_PARITY_FIXTURES", Path(__file__).resolve().parents[2] / "shared" / "fixtures"))
    if not root.is_dir():
        pytest.skip(f"parity fixtures not found at {root} (set OVD_PARITY_FIXTURES)")
    return root
