"""`cache_kjt_recat`: TorchRec's all-to-all permute index is built once per arguments (no host copy a step) and is
the index TorchRec builds."""

from __future__ import annotations

import torch
from torchrec.distributed import dist_data

from embeddings.sharding import cache_kjt_recat


def test_the_recat_index_is_built_once_and_equals_torchrecs() -> None:
    original = dist_data._get_recat
    cache_kjt_recat()
    cache_kjt_recat()  # twice: still one layer of caching
    cached = dist_data._get_recat
    try:
        assert getattr(cached, "lemur_cached", False)
        cpu = torch.device("cpu")
        for args in (
            (2, 4, 1, cpu, None),
            (2, 4, 2, cpu, None),
            (3, 2, 1, cpu, [4, 6]),
            (0, 4, 2, cpu, None),
        ):
            first, again = cached(*args), cached(*args)
            assert first is again
            reference = (original if not getattr(original, "lemur_cached", False) else cached)(*args)
            assert (first is None) == (reference is None)
            if first is not None:
                assert torch.equal(first, reference)
        assert cached(2, 4, 2, cpu).tolist() == [0, 4, 2, 6, 1, 5, 3, 7]  # TorchRec's docstring example
    finally:
        dist_data._get_recat = original
