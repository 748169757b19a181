"""benchmarks/shapes_vae_scale.py: the round trip keeps shapes and the oracle check can fail."""

import numpy as np

from attnlens._testing import tiny_pipeline


def test_round_trip_shapes_and_a_failing_vae():
    from benchmarks import shapes_vae_scale as bench

    vae = tiny_pipeline().vae  # random weights: the oracle cannot read its reconstructions
    out = bench.measure(vae, scenes=2, sizes=[16, 32])
    assert set(out) == {"16", "32"}
    assert out["32"]["latent_shape"][-1] == 2 * out["16"]["latent_shape"][-1]
    assert out["16"]["oracle_reads_all_five"] == 0.0 and out["16"]["mean_abs_error_0_255"] > 10
    image = np.zeros((16, 16, 3), np.uint8)
    rec, shape = bench.round_trip(vae, image)
    assert rec.shape == image.shape and rec.dtype == np.uint8
