import os

import pytest
import torch

# Two cores in CI: fixed thread count keeps timings and float reductions repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _isolate_minilab_dirs(tmp_path, monkeypatch):
    """Tests never write into the user's models/ or cache: every default root points into tmp."""
    monkeypatch.setenv("MINILAB_MODELS_DIR", str(tmp_path / "registry"))
    monkeypatch.setenv("MINILAB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
