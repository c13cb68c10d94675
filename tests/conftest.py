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


@pytest.fixture
def one_thread():
    """Decoding a tiny model is fastest on one thread (the verbs pick that too); the suite's
    setting comes back afterwards. Modules that decode use it with
    `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
