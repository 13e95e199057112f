"""Shared test setup: offline hub/datasets/wandb, and one toy parent built once per session."""

import os

# Set before anything imports transformers/datasets: each hub look-up would otherwise retry DNS.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
# pytest-xdist runs one worker per core (pyproject addopts): one torch thread each, or OpenMP threads of two
# workers spin against each other on a 2-core machine
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402


@pytest.fixture(scope="session")
def toy_parent(tmp_path_factory):
    """Path of a small trained toy NemotronH parent (``TOY_TEST`` settings), built once per session."""
    from elastic.toy import TOY_TEST, build_toy_parent

    return build_toy_parent(tmp_path_factory.mktemp("toy") / "parent", progress=False, **TOY_TEST)


@pytest.fixture
def one_thread():
    """One torch thread for the test: tiny models gain nothing from threads, and a busy 2-core machine
    makes OpenMP threads crawl (modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
