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
