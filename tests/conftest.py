import os

os.environ.setdefault("OMP_NUM_THREADS", "2")

pytest_plugins = []
if os.path.exists(os.path.join(os.path.dirname(__file__), "s3_server.py")):
    pytest_plugins.append("tests.s3_server")
