import os

import pytest

os.environ.setdefault("OMP_NUM_THREADS", "2")

# fixtures s3_server / s3_bucket: a real S3-compatible server (moto) on 127.0.0.1
pytest_plugins = ["tests.s3_server"]


@pytest.fixture(autouse=True)
def _one_faiss_thread():
    """Small indexes build and search faster on one thread when the test machine is busy."""
    import faiss

    before = faiss.omp_get_max_threads()
    faiss.omp_set_num_threads(1)
    yield
    faiss.omp_set_num_threads(before)


# ---------------------------------------------------------------- fixtures of the run tests (tests/run_helpers.py)
# A test module that defines its own `archive` or `config` uses that one instead.


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    """A small local media archive (run_helpers.make_archive), shared by a test module."""
    from tests.run_helpers import make_archive  # imported here: it brings the CLI, Beam and torch

    root = tmp_path_factory.mktemp("archive")
    make_archive(root)
    return root


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    """The job config of the run tests (run_helpers.write_config), shared by a test module."""
    from tests.run_helpers import write_config

    return write_config(tmp_path_factory.mktemp("cfg"))
