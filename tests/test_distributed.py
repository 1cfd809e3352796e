import pytest
import torch

from gloo import run_gloo
from normlab.distributed import all_reduce_sum, is_distributed, rank, world_size


def test_single_process_is_a_no_op():
    a, b = torch.arange(3.0), torch.tensor(2.0)
    assert not is_distributed() and world_size() == 1 and rank() == 0
    out = all_reduce_sum(a, b)
    assert out[0] is a and out[1] is b


def _sum_on_ranks(r: int, n: int):
    stats = torch.full((2, 3), float(r + 1))
    count = torch.tensor([10.0 * (r + 1)])
    summed, total = all_reduce_sum(stats, count)
    return {"rank": rank(), "world": world_size(), "distributed": is_distributed(), "stats": summed,
            "count": total, "input_untouched": bool((stats == r + 1).all())}


def test_two_gloo_ranks_sum_packed_statistics():
    results = run_gloo(_sum_on_ranks, 2)
    for r, res in enumerate(results):
        assert res["rank"] == r and res["world"] == 2 and res["distributed"] and res["input_untouched"]
        torch.testing.assert_close(res["stats"], torch.full((2, 3), 3.0))
        torch.testing.assert_close(res["count"], torch.tensor([30.0]))


def _mixed_dtypes(r: int, n: int):
    all_reduce_sum(torch.zeros(2), torch.zeros(2, dtype=torch.float64))


def test_mixed_dtypes_are_refused():
    with pytest.raises(RuntimeError, match="one dtype"):
        run_gloo(_mixed_dtypes, 2)
