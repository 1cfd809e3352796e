"""Every batch-statistics layer of issue 5 on 2 gloo ranks equals one process holding the whole batch:
outputs, input gradients, summed parameter gradients and running statistics, over two training steps
(float64). One launch runs every case; ``sync_norms`` on a BatchNorm CNN is compared with torch's own
``nn.BatchNorm2d`` on the whole batch (torch's ``nn.SyncBatchNorm`` does not run on CPU)."""

from __future__ import annotations

import pytest
import torch
from gloo import run_gloo

from normlab.bench.tasks import DigitsCNN, bn_relu
from normlab.convert import sync_norms
from normlab.layers import (AdaB2N, AlphaBatchNorm, BatchChannelNorm2d, EvoNormB0, LearnableRegionNorm2d,
                            RegionNorm2d, adab2n_loss, end_task, set_task_counts)

BATCH, STEPS = 8, 2


def _adab2n():
    module = AdaB2N(6, num_tasks=3, kappa=0.4)
    end_task(module)
    with torch.no_grad():
        module.task_weight.copy_(torch.tensor([0.3, -0.2, 0.0]))
    return module


def _mask(x):
    return (torch.arange(x.shape[2] * x.shape[3]).reshape(1, 1, *x.shape[2:]) + torch.arange(x.shape[0])[:, None, None,
                                                                                                        None]) % 3 == 0


# name -> (build, input shape, train mode)
CASES = {
    "evonorm_b0": (lambda: EvoNormB0(6), (6, 3, 3), True),
    "bcn_estimate": (lambda: BatchChannelNorm2d(6, num_groups=2, momentum=0.1), (6, 3, 3), True),
    "bcn_batchnorm": (lambda: BatchChannelNorm2d(6, num_groups=2, momentum=0.1, estimate=False), (6, 3, 3), True),
    "alpha_bn_train": (lambda: AlphaBatchNorm(6), (6, 3, 3), True),
    "alpha_bn_eval": (lambda: AlphaBatchNorm(6, alpha=0.3), (6, 5), False),
    "region_b": (lambda: RegionNorm2d(6), (6, 4, 4), True),
    "region_l": (lambda: LearnableRegionNorm2d(6, threshold=0.5, kernel_size=3), (6, 4, 4), True),
    "adab2n": (_adab2n, (6, 3, 3), True),
    "sync_norms_cnn": (lambda: DigitsCNN(bn_relu), (1, 8, 8), True),
}


def _forward(name, module, x, lo, hi):
    if name == "region_b":
        return module(x, _mask(torch.zeros(BATCH, 1, *x.shape[2:]))[lo:hi])
    if name == "adab2n":
        set_task_counts(module, (torch.arange(BATCH) % 2)[lo:hi])
    return module(x)


def _run_cases(rank: int, world_size: int) -> dict:
    out = {}
    for name, (build, shape, train) in CASES.items():
        torch.manual_seed(0)
        module = build().double().train(train)
        if name == "sync_norms_cnn" and world_size > 1:
            sync_norms(module)
        gen = torch.Generator().manual_seed(1)
        lo, hi = rank * BATCH // world_size, (rank + 1) * BATCH // world_size
        steps = []
        for _ in range(STEPS):
            x = torch.randn(BATCH, *shape, generator=gen, dtype=torch.float64) * 1.5 + 0.5
            x_local = x[lo:hi].clone().requires_grad_()
            y = _forward(name, module, x_local, lo, hi)
            w = torch.randn(BATCH, *y.shape[1:], generator=gen, dtype=torch.float64)
            loss = (y * w[lo:hi]).sum()
            if name == "adab2n":
                loss = loss + adab2n_loss(module) / world_size
            loss.backward()
            steps.append({"y": y.detach(), "x_grad": x_local.grad,
                          "grads": {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}})
            module.zero_grad()
        out[name] = {"steps": steps, "state": {k: v.clone() for k, v in module.state_dict().items()}}
    return out


@pytest.fixture(scope="module")
def ranks_and_reference():
    return run_gloo(_run_cases, 2), _run_cases(0, 1)


@pytest.mark.parametrize("name", list(CASES))
def test_two_ranks_equal_one_process_on_the_whole_batch(ranks_and_reference, name):
    ranks, reference = ranks_and_reference
    parts = [r[name] for r in ranks]
    for step, expected in enumerate(reference[name]["steps"]):
        got = [p["steps"][step] for p in parts]
        torch.testing.assert_close(torch.cat([g["y"] for g in got]), expected["y"], rtol=0, atol=1e-10)
        torch.testing.assert_close(torch.cat([g["x_grad"] for g in got]), expected["x_grad"], rtol=0, atol=1e-10)
        assert set(expected["grads"]) == set(got[0]["grads"]) and expected["grads"]
        for pname, grad in expected["grads"].items():
            torch.testing.assert_close(sum(g["grads"][pname] for g in got), grad, rtol=0, atol=1e-10)
    for part in parts:
        assert part["state"].keys() == reference[name]["state"].keys()
        for key, value in reference[name]["state"].items():
            torch.testing.assert_close(part["state"][key], value, rtol=0, atol=1e-12, msg=f"{name}: {key}")


def test_the_cases_do_use_batch_statistics(ranks_and_reference):
    """Guard against a vacuous comparison: on its half of the batch, each layer's output differs from what
    the same layer gives on the whole batch."""
    ranks, reference = ranks_and_reference
    for name, (build, shape, train) in CASES.items():
        torch.manual_seed(0)
        module = build().double().train(train)
        x = torch.randn(BATCH, *shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64) * 1.5 + 0.5
        half = _forward(name, module, x[: BATCH // 2], 0, BATCH // 2)
        assert not torch.allclose(half, reference[name]["steps"][0]["y"][: BATCH // 2], atol=1e-6), name
