"""The suite on two cores (`python -m pytest -q -n 2 tests`, pytest-xdist): each worker, and every
script it launches, runs torch on one thread, so that two workers share two cores without
oversubscription. A plain `python -m pytest` run is unchanged."""
import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch
    torch.set_num_threads(1)
