import math

import pytest
import torch
import torch.nn.functional as F

from normlab.bench.tasks import DDPMSchedule
from normlab.training.guidance import (AdaptiveGuidance, LinearAG, TruncatedGuidance, calibrate_threshold,
                                       ddpm_sample, guidance_cosine, predicted_x0)

S = 3.0
N = 12

pytestmark = pytest.mark.usefixtures("one_thread")


class CountingModel:
    """A fixed nonlinear epsilon model; counts the rows it actually receives."""

    def __init__(self, dim=6, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.w = torch.randn(dim, dim, generator=gen) / math.sqrt(dim)
        self.emb = torch.randn(11, dim, generator=gen)
        self.rows = 0

    def __call__(self, x, t, c):
        self.rows += x.shape[0]
        c = torch.as_tensor(c).expand(x.shape[0])
        return torch.tanh(x @ self.w + self.emb[c] + 0.05 * t[:, None].float())


def plain_cfg_sample(model, schedule, cond, null, shape, generator, scale):
    """An independent plain CFG DDPM ancestral sampler."""
    x = torch.randn(shape, generator=generator)
    for n in range(schedule.num_steps, 0, -1):
        t = torch.full((shape[0],), n)
        eps_c, eps_u = model(x, t, cond), model(x, t, null)
        eps = eps_u + scale * (eps_c - eps_u)
        beta, alpha, abar = (schedule.betas[n - 1].item(), schedule.alphas[n - 1].item(),
                             schedule.alphas_cumprod[n - 1].item())
        x = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(alpha)
        if n > 1:
            x = x + math.sqrt(beta) * torch.randn(shape, generator=generator)
    return x


def sample(guidance, model, cond, b=4, seed=0, **kw):
    return ddpm_sample(model, DDPMSchedule(N, 1e-3, 0.2), guidance, cond, 10, (b, 6),
                       torch.Generator().manual_seed(seed), **kw)


def test_threshold_inf_is_plain_cfg_bit_for_bit_with_2nb_evaluations():
    cond = torch.tensor([0, 3, 7, 9])
    model = CountingModel()
    for space in ("eps", "x0"):
        model.rows = 0
        x, info = sample(AdaptiveGuidance(S, math.inf, space=space), model, cond)
        ref = plain_cfg_sample(CountingModel(), DDPMSchedule(N, 1e-3, 0.2), cond, 10, (4, 6),
                               torch.Generator().manual_seed(0), S)
        assert torch.equal(x, ref)
        assert info["nfe"] == model.rows == 2 * N * 4 and info["guided"] == [4] * N


def test_threshold_minus_one_guides_only_the_first_step():
    cond = torch.tensor([1, 2, 3])
    model = CountingModel()
    ag = AdaptiveGuidance(S, -1.0)
    x, info = sample(ag, model, cond, b=3)
    assert info["nfe"] == model.rows == (N + 1) * 3
    assert info["guided"] == [3] + [0] * (N - 1) and not ag.guided_mask.any()
    # equals: CFG at the first step, conditional afterwards = truncation at k = 1
    y, info_t = sample(TruncatedGuidance(S, 1), CountingModel(), cond, b=3)
    assert torch.equal(x, y) and info_t["nfe"] == (N + 1) * 3


def test_truncation_and_min_guided_steps():
    cond = torch.tensor([4, 5])
    for k in (0, 3, N):
        model = CountingModel()
        _, info = sample(TruncatedGuidance(S, k), model, cond, b=2)
        assert info["guided"] == [2] * k + [0] * (N - k) and info["nfe"] == model.rows == (N + k) * 2
    for m in (0, 1, 5):
        _, info = sample(AdaptiveGuidance(S, -1.0, min_guided_steps=m), CountingModel(), cond, b=2)
        assert info["guided"] == [2] * max(m, 1) + [0] * (N - max(m, 1))
    x, _ = sample(AdaptiveGuidance(S, -1.0, min_guided_steps=5), CountingModel(), cond, b=2)
    y, _ = sample(TruncatedGuidance(S, 5), CountingModel(), cond, b=2)
    assert torch.equal(x, y)
    _, info = sample(TruncatedGuidance(S, 0), CountingModel(), cond, b=2)
    assert math.isnan(info["cosine"][0])


def test_per_sample_independence_and_nfe_adds_up():
    cond = torch.tensor([2, 8])
    model = CountingModel()
    sched = DDPMSchedule(N, 1e-3, 0.2)
    gen = torch.Generator().manual_seed(3)
    x0 = torch.randn(2, 6, generator=gen)
    noises = [torch.randn(2, 6, generator=gen) for _ in range(N)]

    def run(rows):
        policy = AdaptiveGuidance(S, 0.9, space="x0")
        policy.reset(len(rows))
        x, guided = x0[rows], []
        for i, n in enumerate(range(N, 0, -1)):
            guided.append(policy.guided_mask)
            abar = sched.alphas_cumprod[n - 1].item()
            eps = policy(model, x, torch.full((len(rows),), n), cond[rows], 10, abar)
            beta, alpha = sched.betas[n - 1].item(), sched.alphas[n - 1].item()
            x = (x - beta / math.sqrt(1 - abar) * eps) / math.sqrt(alpha) + math.sqrt(beta) * noises[i][rows]
        return x, policy.nfe, torch.stack(guided)

    both, nfe_both, g_both = run([0, 1])
    one, nfe0, g0 = run([0])
    two, nfe1, g1 = run([1])
    torch.testing.assert_close(both, torch.cat([one, two]), atol=1e-6, rtol=0)
    assert nfe_both == nfe0 + nfe1 and torch.equal(g_both, torch.cat([g0, g1], 1))
    assert N + 1 < nfe0 < 2 * N and nfe_both == 2 * N + int(g_both.sum())  # fired somewhere mid-way


def test_cosine_matches_torch_and_handles_zero_vectors():
    gen = torch.Generator().manual_seed(0)
    a, b = torch.randn(5, 3, 4, generator=gen), torch.randn(5, 3, 4, generator=gen)
    torch.testing.assert_close(guidance_cosine(a, b), F.cosine_similarity(a.flatten(1), b.flatten(1), dim=1))
    half = guidance_cosine(a.half(), b.half())
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, F.cosine_similarity(a.half().float().flatten(1), b.half().float().flatten(1)))
    a[1] = 0
    cos = guidance_cosine(a, b)
    assert cos[1] == 0 and torch.isfinite(cos).all()
    with pytest.raises(ValueError, match="same shape"):
        guidance_cosine(a, b[:, :2])


def test_zero_predictions_never_fire():
    zero = lambda x, t, c: torch.zeros_like(x)  # noqa: E731
    ag = AdaptiveGuidance(S, 0.5)
    ag.reset(3)
    for _ in range(4):
        ag(zero, torch.randn(3, 6), torch.full((3,), 5), 1, 10)
    assert ag.guided_mask.all() and ag.nfe == 4 * 6 and torch.equal(ag.last_cosine, torch.zeros(3))


def test_x0_space_uses_the_x0_formula_and_both_criteria():
    gen = torch.Generator().manual_seed(1)
    x, ec, eu = (torch.randn(3, 6, generator=gen) for _ in range(3))
    abar = torch.tensor([0.9, 0.5, 0.1])
    model = lambda xx, t, c: ec[: len(xx)] if c == 1 else eu[: len(xx)]  # noqa: E731
    for criterion in ("cond_vs_cfg", "cond_vs_uncond"):
        ag = AdaptiveGuidance(S, math.inf, criterion=criterion, space="x0")
        ag.reset(3)
        ag(model, x, torch.ones(3, dtype=torch.long), 1, 0, abar)
        other = eu + S * (ec - eu) if criterion == "cond_vs_cfg" else eu
        s = abar[:, None]
        x0c, x0o = (x - (1 - s).sqrt() * ec) / s.sqrt(), (x - (1 - s).sqrt() * other) / s.sqrt()
        torch.testing.assert_close(ag.last_cosine, F.cosine_similarity(x0c, x0o, dim=1))
        torch.testing.assert_close(predicted_x0(x, ec, abar), x0c)
    ag = AdaptiveGuidance(S, math.inf)
    ag.reset(3)
    ag(model, x, torch.ones(3, dtype=torch.long), 1, 0)
    torch.testing.assert_close(ag.last_cosine, F.cosine_similarity(ec, eu + S * (ec - eu), dim=1))


def linear_toy(a, b, seed=0):
    """eps_u(k) = a eps_c(k) + b eps_u(k-1) exactly (eps_u(0) = a fixed function); the model tracks the
    true unconditional value per sample through its conditional calls (called on the full batch first)."""
    base = CountingModel(seed=seed)
    state = {"u": None}

    def model(x, t, c):
        if not isinstance(c, torch.Tensor) or c.dim() == 0:  # unconditional: rows of the current true value
            rows = x.shape[0]
            assert rows == state["u"].shape[0], "the toy needs the full batch"
            base.rows += rows
            return state["u"]
        eps_c = base(x, t, c)
        state["u"] = torch.sin(x) if state["u"] is None else a * eps_c + b * state["u"]
        return eps_c

    return model, state, base


def test_linear_ag_fits_an_exactly_linear_toy_and_reproduces_cfg():
    a, b = 0.6, -0.3
    cond = torch.tensor([0, 1, 2, 3, 4, 5])
    trajectories = []
    for seed in (0, 1):
        model, state, _ = linear_toy(a, b)
        _, info = sample(AdaptiveGuidance(S, math.inf), model, cond, b=6, seed=seed, record=True)
        trajectories.append({"eps_c": info["eps_c"], "eps_u": list(info["eps_u"])})
    lag = LinearAG(S, math.inf, linear_steps=range(1, N))
    coef = lag.fit(trajectories)
    for k in range(1, N):
        torch.testing.assert_close(coef[k], torch.tensor([a, 0.0, b], dtype=torch.float64), atol=1e-6, rtol=0)
    model, state, counter = linear_toy(a, b)
    x_lag, info = sample(lag, model, cond, b=6, seed=5)
    assert info["nfe"] == counter.rows == N * 6 + 6  # one real unconditional call: step 0
    model, state, _ = linear_toy(a, b)
    x_cfg, _ = sample(AdaptiveGuidance(S, math.inf), model, cond, b=6, seed=5)
    torch.testing.assert_close(x_lag, x_cfg, atol=1e-5, rtol=0)
    # state round trip
    other = LinearAG(S, math.inf, linear_steps=range(1, N))
    other.load_state_dict(lag.state_dict())
    model, state, _ = linear_toy(a, b)
    torch.testing.assert_close(sample(other, model, cond, b=6, seed=5)[0], x_lag, atol=0, rtol=0)
    with pytest.raises(ValueError, match="linear_steps"):
        LinearAG(S, linear_steps=[1], window=2).load_state_dict(lag.state_dict())


def test_linear_ag_window_two_and_partial_batches():
    a, b = 0.5, 0.4
    cond = torch.tensor([0, 1, 2, 3])
    model, _, _ = linear_toy(a, b)
    _, info = sample(AdaptiveGuidance(S, math.inf), model, cond, record=True)
    lag = LinearAG(S, math.inf, linear_steps=[3, 4], window=2)
    coef = lag.fit([info])
    assert coef[3].shape == (5,)
    # the fitted combination reproduces eps_u exactly at the fitted steps
    for k in (3, 4):
        c, u = info["eps_c"].double(), info["eps_u"].double()
        est = coef[k][0] * c[k] + coef[k][1] * c[k - 1] + coef[k][2] * u[k - 1] + coef[k][3] * c[k - 2] \
            + coef[k][4] * u[k - 2]
        torch.testing.assert_close(est, u[k], atol=1e-6, rtol=0)


def test_calibrate_threshold_picks_the_grid_point_closest_to_the_target():
    ratios = {0.9: 0.6, 0.95: 0.7, 0.98: 0.8, 0.99: 0.86}
    assert calibrate_threshold(ratios.get, 0.75, grid=list(ratios)) == 0.98  # tie 0.7/0.8 -> larger
    assert calibrate_threshold(ratios.get, 0.62, grid=list(ratios)) == 0.9
    model = CountingModel()
    cond = torch.tensor([0, 5, 9])

    def nfe_ratio(threshold):
        return sample(AdaptiveGuidance(S, threshold, space="x0"), model, cond, b=3)[1]["nfe"] / (2 * N * 3)

    chosen = calibrate_threshold(nfe_ratio, 1.0, grid=(-1.0, 0.5, math.inf))
    assert chosen == math.inf
    with pytest.raises(ValueError, match="target_nfe_ratio"):
        calibrate_threshold(nfe_ratio, 0.2)


def test_errors():
    with pytest.raises(ValueError, match="guidance_scale"):
        AdaptiveGuidance(-1.0)
    for bad in (1.5, -1.01, math.nan):
        with pytest.raises(ValueError, match="threshold"):
            AdaptiveGuidance(threshold=bad)
    with pytest.raises(ValueError, match="criterion"):
        AdaptiveGuidance(criterion="uncond")
    with pytest.raises(ValueError, match="space"):
        AdaptiveGuidance(space="v")
    with pytest.raises(ValueError, match="min_guided_steps"):
        AdaptiveGuidance(min_guided_steps=-1)
    with pytest.raises(ValueError, match="guided_steps"):
        TruncatedGuidance(guided_steps=-2)
    with pytest.raises(ValueError, match="window"):
        LinearAG(window=0)
    with pytest.raises(ValueError, match="linear_steps"):
        LinearAG(linear_steps=[0])
    model = CountingModel()
    ag = AdaptiveGuidance(S)
    with pytest.raises(RuntimeError, match="reset"):
        ag(model, torch.randn(2, 6), torch.ones(2, dtype=torch.long), 1, 10)
    ag.reset(2)
    with pytest.raises(ValueError, match="batch of 2"):
        ag(model, torch.randn(3, 6), torch.ones(3, dtype=torch.long), 1, 10)
    with pytest.raises(ValueError, match="eps_u"):
        ag(lambda x, t, c: x if c == 1 else x[:, :3], torch.randn(2, 6), None, 1, 0)
    with pytest.raises(ValueError, match="alpha_bar_t"):
        x0 = AdaptiveGuidance(S, space="x0")
        x0.reset(2)
        x0(model, torch.randn(2, 6), torch.ones(2, dtype=torch.long), 1, 10)
    lag = LinearAG(S, math.inf, linear_steps=[2])
    with pytest.raises(ValueError, match="no fitted coefficients"):
        sample(lag, CountingModel(), torch.tensor([1, 2]), b=2)
    with pytest.raises(ValueError, match="eps_u has shape"):
        lag.fit([{"eps_c": torch.zeros(N, 2, 6), "eps_u": torch.zeros(N, 2, 5)}])
    with pytest.raises(ValueError, match="steps"):
        lag.fit([{"eps_c": torch.zeros(2, 2, 6), "eps_u": torch.zeros(2, 2, 6)}])
