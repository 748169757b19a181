"""set_threads limits torch and the BLAS/OpenMP pools numpy and scikit-learn use (a 2-thread BLAS spin-waits on
a busy core: chapter 5's MLP probe ran 18x its idle time with one core held, benchmarks/results/book_build_time.json)."""

import numpy as np
import pytest
import torch

from attnlens import AttnlensError, set_threads


def test_set_threads_limits_torch_and_the_blas_pools():
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = torch.get_num_threads()
    np.ones((64, 64)) @ np.ones((64, 64))  # load the BLAS
    try:
        assert set_threads(1) == 1 and torch.get_num_threads() == 1
        assert all(p["num_threads"] == 1 for p in threadpoolctl.threadpool_info())
    finally:
        set_threads(before)
    with pytest.raises(AttnlensError, match="whole number"):
        set_threads(0)
