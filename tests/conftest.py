import os

import pytest
import torch

# Tests share two cores with whatever else runs; keep torch to one thread unless a test says otherwise.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    """Each test session gets its own cache dir unless a test sets one."""
    if "CPBENCH_CACHE_DIR" not in os.environ:
        monkeypatch.setenv("CPBENCH_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "cpbench-cache"))
    yield


@pytest.fixture
def plugins():
    from cpbench.pluginmanager import get_plugins

    return get_plugins()


@pytest.fixture
def fresh_state():
    """No memoised models/decompositions and a freshly loaded plugin set, before and after."""
    from cpbench.pluginmanager import reset_plugins
    from cpbench.runner import clear_memo

    clear_memo()
    reset_plugins()  # whatever an earlier test left: the entry-point plugin set
    yield
    clear_memo()
    reset_plugins()
