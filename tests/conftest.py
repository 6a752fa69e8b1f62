import os

# The Triton kernels are tested on CPU through the interpreter; it must be chosen before triton
# is imported anywhere.
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except ImportError:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if _HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """The models of the application tests are tiny (16x16 digits, a few ResNet images): a
    second intra-op thread gains little, and with anything else running on a 2-core machine it
    made those tests 3x slower (OpenMP threads waiting on each other; measured at load 2-5:
    367 s against 114 s). Modules opt in with `pytestmark = pytest.mark.usefixtures(...)`."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def teacher():
    """The shipped digits teacher (99.3 % on the real test digits)."""
    from dinv import models

    return models.load_digits_teacher()


@pytest.fixture(scope="module")
def test_digits():
    """The real held-out digits (450 images)."""
    from dinv.datasets import load_digits

    return load_digits("test")
