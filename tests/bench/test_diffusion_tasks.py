"""The 2-D diffusion pieces of bench/tasks.py: swiss-roll data and the DDPM schedule, against numpy and by hand."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import make_swiss_roll

from normlab.bench.tasks import DDPMSchedule, swiss_roll
from normlab.layers.td_layernorm import tdln_time_from_step


def test_swiss_roll_is_sklearn_x_z_over_5():
    pts = swiss_roll(500, noise=0.3, seed=4)
    ref, _ = make_swiss_roll(500, noise=0.3, random_state=4)
    assert pts.shape == (500, 2) and pts.dtype == torch.float32
    np.testing.assert_allclose(pts.numpy(), np.stack([ref[:, 0], ref[:, 2]], 1) / 5, rtol=1e-6, atol=1e-6)
    assert torch.equal(swiss_roll(500, seed=4), pts) and not torch.equal(swiss_roll(500, seed=5), pts)
    assert -3 < pts.min() and pts.max() < 3.5


def test_linear_beta_schedule_against_a_hand_product():
    sched = DDPMSchedule(200, 1e-4, 0.02)
    assert sched.betas.shape == sched.alphas_cumprod.shape == (200,)
    assert sched.betas[0].item() == pytest.approx(1e-4) and sched.betas[-1].item() == pytest.approx(0.02)
    np.testing.assert_allclose(np.diff(sched.betas.numpy()), (0.02 - 1e-4) / 199, rtol=1e-9)
    prod, abar = 1.0, []
    for k in range(200):
        prod *= 1 - (1e-4 + k * (0.02 - 1e-4) / 199)
        abar.append(prod)
    np.testing.assert_allclose(sched.alphas_cumprod.numpy(), abar, rtol=1e-12)
    torch.testing.assert_close(sched.alphas, 1 - sched.betas)
    assert 0.1 < sched.alphas_cumprod[-1] < 0.2  # 200 steps leave some signal: ~0.13


def test_q_sample_matches_the_formula_row_by_row():
    sched = DDPMSchedule(50, 1e-3, 0.05)
    gen = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(6, 2, generator=gen), torch.randn(6, 2, generator=gen)
    n = torch.tensor([1, 2, 10, 25, 49, 50])
    out = sched.q_sample(x0, n, noise)
    for row in range(6):
        abar = math.prod(1 - (1e-3 + k * (0.05 - 1e-3) / 49) for k in range(int(n[row])))
        expected = math.sqrt(abar) * x0[row] + math.sqrt(1 - abar) * noise[row]
        torch.testing.assert_close(out[row], expected, atol=1e-6, rtol=0)
    images = torch.randn(6, 3, 4, 4, generator=gen)
    img_out = sched.q_sample(images, n, torch.zeros_like(images))
    torch.testing.assert_close(img_out[3], images[3] * sched.alphas_cumprod[24].sqrt().float())


def test_forward_process_keeps_unit_variance_data_at_unit_variance():
    sched = DDPMSchedule(200)
    gen = torch.Generator().manual_seed(1)
    x0 = torch.randn(200_000, 2, generator=gen)
    n = torch.full((200_000,), 120)
    xn = sched.q_sample(x0, n, torch.randn(x0.shape, generator=gen))
    assert xn.var().item() == pytest.approx(1.0, abs=0.01)
    corr = (xn[:, 0] * x0[:, 0]).mean().item()
    assert corr == pytest.approx(sched.alphas_cumprod[119].sqrt().item(), abs=0.01)


def test_steps_and_time_input():
    sched = DDPMSchedule(200)
    n = sched.sample_steps(20_000, torch.Generator().manual_seed(0))
    assert n.dtype == torch.long and n.min() == 1 and n.max() == 200
    assert torch.equal(n, sched.sample_steps(20_000, torch.Generator().manual_seed(0)))
    tau = sched.time_input(torch.tensor([1, 100, 200]))
    assert tau.dtype == torch.float32
    torch.testing.assert_close(tau, torch.tensor([-0.99, 0.0, 1.0]))
    torch.testing.assert_close(sched.time_input(n), tdln_time_from_step(n, 200))


def test_schedule_errors():
    with pytest.raises(ValueError, match="num_steps must be a positive int"):
        DDPMSchedule(0)
    with pytest.raises(ValueError, match="need 0 < beta_start <= beta_end < 1"):
        DDPMSchedule(10, 0.02, 1e-4)
    sched = DDPMSchedule(10)
    x0 = torch.zeros(3, 2)
    with pytest.raises(ValueError, match=r"expected n of shape \(3,\) and noise of shape \(3, 2\)"):
        sched.q_sample(x0, torch.ones(2, dtype=torch.long), x0)
    with pytest.raises(ValueError, match=r"steps must lie in 1..10, got 0..11"):
        sched.q_sample(x0, torch.tensor([0, 5, 11]), x0)
