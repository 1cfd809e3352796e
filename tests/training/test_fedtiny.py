import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.training.fedtiny import (BNStats, FedTiny, adaptive_bn_selection, aggregate_bn_stats, apply_masks,
                                      candidate_masks, erk_densities, fedavg, install_bn_stats, magnitude_masks,
                                      prunable_weights, prune_and_grow, reestimate_bn_stats, topk_pruned_grads)


def digits_cnn():
    return nn.Sequential(nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
                         nn.Flatten(), nn.Linear(128, 10))


def tiny_cnn():
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def tiny_clients(sizes=(12, 7, 9), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [(torch.randn(n, 1, 6, 6, generator=gen) + k, torch.randint(3, (n,), generator=gen))
            for k, n in enumerate(sizes)]


def batches(x, size):
    return [(xb, None) for xb in x.split(size)]


# --- BN statistics ------------------------------------------------------------------------------------------
def test_reestimate_equals_exact_dataset_statistics_and_leaves_model_alone():
    torch.manual_seed(0)
    model = tiny_cnn()
    x = torch.randn(50, 1, 6, 6) * 2 + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.eval()
    stats = reestimate_bn_stats(model, batches(x, 16), num_batches=10)
    pre = model[0](x).detach().double()
    assert torch.allclose(stats["1"].mean, pre.mean((0, 2, 3)), atol=1e-6)
    assert torch.allclose(stats["1"].var, pre.var((0, 2, 3), unbiased=False), atol=1e-5)
    assert stats["1"].count == 50 * 16
    assert not model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # num_batches limits the data used
    two = reestimate_bn_stats(model, batches(x, 16), num_batches=2)
    assert two["1"].count == 32 * 16
    assert torch.allclose(two["1"].mean, pre[:32].mean((0, 2, 3)), atol=1e-6)


def test_reestimate_is_not_the_momentum_none_average():
    torch.manual_seed(0)
    model = tiny_cnn()
    x = torch.cat([torch.randn(8, 1, 6, 6), torch.randn(8, 1, 6, 6) + 3])   # batch means differ
    stats = reestimate_bn_stats(model, batches(x, 8))
    model[1].momentum = None
    model[1].reset_running_stats()
    model.train()
    with torch.no_grad():
        for xb, _ in batches(x, 8):
            model(xb)
    pre = model[0](x).detach().double()
    per_batch = torch.stack([pre[:8].var((0, 2, 3)), pre[8:].var((0, 2, 3))]).mean(0)
    assert torch.allclose(model[1].running_var.double(), per_batch, atol=1e-5)       # what torch keeps
    assert torch.allclose(stats["1"].var, pre.var((0, 2, 3), unbiased=False), atol=1e-5)
    assert (stats["1"].var - per_batch).abs().max() > 1.0      # the spread of the batch means is kept


def test_aggregate_bn_stats_equals_concatenated_data():
    torch.manual_seed(0)
    model = tiny_cnn()
    clients = tiny_clients()
    per_client = [reestimate_bn_stats(model, batches(x, 5), num_batches=100) for x, _ in clients]
    everything = torch.cat([x for x, _ in clients])
    pre = model[0](everything).detach().double()
    for weights in (None, [len(x) for x, _ in clients]):      # same spatial size: counts ∝ n_k
        pooled = aggregate_bn_stats(per_client, weights)["1"]
        assert torch.allclose(pooled.mean, pre.mean((0, 2, 3)), atol=1e-6)
        assert torch.allclose(pooled.var, pre.var((0, 2, 3), unbiased=False), atol=1e-5)
        assert pooled.count == len(everything) * 16
    # the mean of the variances would be wrong here (client means differ)
    naive = torch.stack([s["1"].var for s in per_client]).mean(0)
    assert (pre.var((0, 2, 3), unbiased=False) - naive).max() > 1.0


def test_install_bn_stats_stores_unbiased_variance():
    model = tiny_cnn()
    stats = {"1": BNStats(torch.tensor([1.0, 2, 3, 4], dtype=torch.float64),
                          torch.tensor([0.5, 1, 2, 4], dtype=torch.float64), 5)}
    install_bn_stats(model, stats)
    assert torch.allclose(model[1].running_mean, torch.tensor([1.0, 2, 3, 4]))
    assert torch.allclose(model[1].running_var, torch.tensor([0.5, 1, 2, 4]) * 5 / 4)
    with pytest.raises(ValueError, match="no BatchNorm layer named 'bn'"):
        install_bn_stats(model, {"bn": stats["1"]})


def test_reestimate_errors():
    model = tiny_cnn()
    with pytest.raises(ValueError, match="batch 1 has 1 example"):
        reestimate_bn_stats(model, [torch.randn(4, 1, 6, 6), torch.randn(1, 1, 6, 6)])
    with pytest.raises(ValueError, match="Invalid num_batches: 0"):
        reestimate_bn_stats(model, [torch.randn(4, 1, 6, 6)], num_batches=0)
    with pytest.raises(ValueError, match="no BatchNorm"):
        reestimate_bn_stats(nn.Linear(2, 2), [torch.randn(4, 2)])


# --- masks --------------------------------------------------------------------------------------------------
def test_erk_densities_hand_derived():
    model = digits_cnn()
    d = erk_densities(model, 0.05)
    # sum(shape) * |W| / |W|: 23, 54, 138 of 215; 302 weights -> 32.31, 75.85, 193.84 -> largest remainder
    assert d == {"0.weight": 32 / 144, "4.weight": 76 / 4608, "9.weight": 194 / 1280}
    masks = magnitude_masks(model, d)
    assert [int(m.sum()) for m in masks.values()] == [32, 76, 194]
    assert sum(int(m.sum()) for m in masks.values()) == round(0.05 * 6032)


def test_erk_caps_at_one_and_redistributes():
    model = nn.Sequential(nn.Linear(2, 2), nn.Linear(100, 100))
    # raw * |W| = 4 and 200; want 5002 * 4 / 204 = 98 > 4 weights -> dense, the rest to the big layer
    assert erk_densities(model, 0.5) == {"0.weight": 1.0, "1.weight": 4998 / 10000}
    # the floor of one weight per output unit: 202 * 52 / 252 = 41.7 < 50 rows -> 50, the rest to the big layer
    model = nn.Sequential(nn.Linear(2, 50), nn.Linear(100, 100))
    assert erk_densities(model, 0.02) == {"0.weight": 50 / 100, "1.weight": 152 / 10000}


def test_magnitude_masks_ties_by_index_and_one_per_output_unit():
    model = nn.Sequential(nn.Linear(5, 4, bias=False))
    with torch.no_grad():
        model[0].weight.fill_(1.0)
    mask = magnitude_masks(model, {"0.weight": 6 / 20})["0.weight"]
    assert sorted(mask.flatten().nonzero().squeeze(1).tolist()) == [0, 1, 2, 5, 10, 15]
    with torch.no_grad():
        model[0].weight.copy_(torch.tensor([[9.0, 8, 7, 6, 5], [0, 0, 0, 0, 0.1], [4, 3, 2, 1, 0], [0, 0, 0, 0, 0]]))
    mask = magnitude_masks(model, {"0.weight": 7 / 20})["0.weight"]
    expected = torch.zeros(4, 5, dtype=torch.bool)
    expected[0, :4] = True
    expected[1, 4] = expected[2, 0] = expected[3, 0] = True
    assert torch.equal(mask, expected)


def test_magnitude_masks_match_topk_on_random_weights():
    torch.manual_seed(0)
    model = digits_cnn()
    masks = magnitude_masks(model, {"4.weight": 0.5})
    w = model[4].weight.detach().abs().flatten()
    top = torch.zeros_like(w, dtype=torch.bool)
    top[torch.topk(w, 2304).indices] = True
    assert torch.equal(masks["4.weight"].flatten(), top)


def test_candidate_masks_hit_the_exact_global_count():
    torch.manual_seed(0)
    model = digits_cnn()
    cands = candidate_masks(model, 0.05, 10, torch.Generator().manual_seed(0))
    assert len(cands) == 10
    assert all(sum(int(m.sum()) for m in c.values()) == 302 for c in cands)
    erk = magnitude_masks(model, erk_densities(model, 0.05))
    assert all(torch.equal(cands[0][k], erk[k]) for k in erk)
    allocations = {tuple(int(m.sum()) for m in c.values()) for c in cands}
    assert len(allocations) > 5
    for c in cands:     # at least one weight per output unit
        assert all(bool(m.flatten(1).any(1).all()) for m in c.values())


def test_apply_masks_keeps_weights_and_grads_zero_after_a_step():
    torch.manual_seed(0)
    model = digits_cnn()
    masks = magnitude_masks(model, erk_densities(model, 0.05))
    apply_masks(model, masks)
    apply_masks(model, masks)     # re-applying does not stack hooks
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = torch.randn(8, 1, 8, 8), torch.randint(10, (8,))
    F.cross_entropy(model(x), y).backward()
    opt.step()
    for name, w in prunable_weights(model).items():
        assert bool((w[~masks[name]] == 0).all()) and bool((w.grad[~masks[name]] == 0).all())
        assert bool((w.grad[masks[name]] != 0).any())
    with pytest.raises(ValueError, match=r"mask for 0.weight has shape \(3,\), expected \(16, 1, 3, 3\)"):
        apply_masks(model, {"0.weight": torch.ones(3, dtype=torch.bool)})
    with pytest.raises(ValueError, match="mask for unknown prunable weight '1.weight'"):
        apply_masks(model, {"1.weight": torch.ones(16, dtype=torch.bool)})


def test_prune_and_grow():
    weight = torch.tensor([0.5, 0.0, -0.1, 0.0, 0.3, 0.0, -0.1, 0.0])
    mask = torch.tensor([True, False, True, False, True, False, True, False])
    new = prune_and_grow(weight, mask, torch.tensor([7, 3, 1, 3]), torch.tensor([1.0, 0.5, 2.0, 0.5]), 2)
    # scores: 1 -> 2.0, 3 -> 1.0 (summed), 7 -> 1.0: grow 1 and 3 (tie with 7 by index); prune |w| 0.1 at 2, 6
    assert new.tolist() == [True, True, False, True, True, False, False, False]
    assert int(new.sum()) == int(mask.sum())
    assert torch.equal(prune_and_grow(weight, mask, torch.tensor([1]), torch.tensor([1.0]), 0), mask)
    # unreported pruned positions score 0 and are grown by index
    assert prune_and_grow(weight, mask, torch.tensor([], dtype=torch.long), torch.tensor([]), 1).tolist() == \
        [True, True, False, False, True, False, True, False]
    with pytest.raises(ValueError, match="currently pruned"):
        prune_and_grow(weight, mask, torch.tensor([0]), torch.tensor([1.0]), 1)
    with pytest.raises(ValueError, match=r"Invalid k: 5 \(need 0 <= k <= min\(active 4, pruned 4\)\)"):
        prune_and_grow(weight, mask, torch.tensor([1]), torch.tensor([1.0]), 5)
    with pytest.raises(ValueError, match="mask must be a bool tensor"):
        prune_and_grow(weight, mask.float(), torch.tensor([1]), torch.tensor([1.0]), 1)


def test_prune_and_grow_random_properties():
    gen = torch.Generator().manual_seed(0)
    for _ in range(20):
        weight = torch.randn(6, 7, generator=gen)
        mask = torch.rand(6, 7, generator=gen) < 0.4
        weight = weight * mask
        pruned = (~mask).flatten().nonzero().squeeze(1)
        scores = torch.rand(len(pruned), generator=gen)
        k = int(torch.randint(0, min(int(mask.sum()), len(pruned)) + 1, (1,), generator=gen))
        new = prune_and_grow(weight, mask, pruned, scores, k)
        grown = new.flatten() & ~mask.flatten()
        dropped = mask.flatten() & ~new.flatten()
        assert int(new.sum()) == int(mask.sum()) and int(grown.sum()) == k
        assert set(grown.nonzero().squeeze(1).tolist()) == set(pruned[torch.topk(scores, k).indices].tolist())
        active = mask.flatten().nonzero().squeeze(1)
        smallest = active[torch.topk(weight.flatten()[active].abs(), k, largest=False).indices]
        assert set(dropped.nonzero().squeeze(1).tolist()) == set(smallest.tolist())


def test_topk_pruned_grads_against_dense_gradient():
    torch.manual_seed(0)
    model = digits_cnn()
    masks = magnitude_masks(model, erk_densities(model, 0.05))
    apply_masks(model, masks)
    x, y = torch.randn(16, 1, 8, 8), torch.randint(10, (16,))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    idx, val = topk_pruned_grads(model, (x, y), "4.weight", 20)
    ref = nn.Sequential(*[m for m in digits_cnn()])
    ref.load_state_dict(before)
    ref.train()
    g = torch.autograd.grad(F.cross_entropy(ref(x), y), ref[4].weight)[0].abs().flatten()
    g[masks["4.weight"].flatten()] = -1
    assert torch.equal(idx, torch.topk(g, 20).indices) and torch.allclose(val, torch.topk(g, 20).values)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    with pytest.raises(ValueError, match="unknown prunable weight '1.weight'"):
        topk_pruned_grads(model, (x, y), "1.weight", 3)
    with pytest.raises(ValueError, match="no mask"):
        topk_pruned_grads(digits_cnn(), (x, y), "4.weight", 3)


# --- FedAvg and the simulator -------------------------------------------------------------------------------
def test_fedavg_weighted_mean_and_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([4.0, 8.0]), "n": torch.tensor(6)}
    out = fedavg([a, b], [1, 2])
    assert torch.equal(out["w"], torch.tensor([3.0, 6.0])) and out["n"].item() == 5 and out["n"].dtype == a["n"].dtype
    with pytest.raises(ValueError, match="fedavg: 2 states and 1 weights"):
        fedavg([a, b], [1])


@pytest.mark.parametrize("density", [1.0, 0.3])
def test_one_client_fedavg_equals_centralised_training(density):
    torch.manual_seed(0)
    model = tiny_cnn()
    (x, y), = tiny_clients(sizes=(21,))
    ref = tiny_cnn()
    ref.load_state_dict(model.state_dict())
    sim = FedTiny(model, [(x, y)], density, selection=0, progressive=False, lr=0.1, batch_size=5, seed=3)
    sim.run(2)
    if density < 1:
        apply_masks(ref, sim.masks)      # the candidate masks come from the same initial weights
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    gen = torch.Generator().manual_seed(3 * 1_000_003 + 0)
    ref.train()
    for _ in range(2):
        order = torch.randperm(21, generator=gen)
        for idx in order.split(5)[:-1]:                   # 5 + 5 + 5 + 5, the trailing batch of 1 is dropped
            opt.zero_grad()
            F.cross_entropy(ref(x[idx]), y[idx]).backward()
            opt.step()
    for k, v in ref.state_dict().items():
        assert torch.allclose(sim.model.state_dict()[k].double(), v.double(), atol=1e-6, rtol=0), k


def small_sim(**kw):
    torch.manual_seed(0)
    clients = tiny_clients(sizes=(20, 14, 17, 11), seed=1)
    return FedTiny(tiny_cnn(), clients, kw.pop("density", 0.2), num_candidates=4, bn_batches=2, batch_size=6,
                   lr=0.1, **kw)


def test_selection_picks_the_minimum_pooled_loss_and_matches_the_function():
    sim = small_sim()
    sim.select()
    losses = torch.tensor(sim.candidate_losses, dtype=torch.float64)
    assert sim.selected == int(torch.argmin(losses)) and losses[sim.selected] == losses.min()
    torch.manual_seed(0)
    model = tiny_cnn()
    cands = candidate_masks(model, 0.2, 4, torch.Generator().manual_seed(0))
    best, l2, stats = adaptive_bn_selection(model, cands, tiny_clients(sizes=(20, 14, 17, 11), seed=1),
                                            num_batches=2, batch_size=6)
    assert best == sim.selected and torch.equal(l2, losses)
    # the pooled statistics are those of the four clients' first two batches, n_k-weighted
    apply_masks(model, cands[best])
    per = [reestimate_bn_stats(model, [(x[:6], None), (x[6:12], None)]) for x, _ in
           tiny_clients(sizes=(20, 14, 17, 11), seed=1)]
    ref = aggregate_bn_stats(per, [20, 14, 17, 11])["1"]
    assert torch.allclose(stats["1"].mean, ref.mean, atol=1e-12) and torch.allclose(stats["1"].var, ref.var)
    assert torch.allclose(sim.model[1].running_var.double(), ref.var * ref.count / (ref.count - 1), atol=1e-6)


def test_progressive_schedule_density_and_bytes():
    sim = small_sim(delta_rounds=2)
    history = sim.run(8, eval_fn=lambda m: 50.0)
    total = sum(w.numel() for w in prunable_weights(sim.model).values())
    kept = round(0.2 * total)
    # R_end = 6: rounds 2, 4, 6; a_6 = 0 so only two changes, layers cycle 0.weight, 4.weight
    names = list(sim.masks)
    changes = history["mask_changes"]
    assert [c[0] for c in changes] == [2, 4] and [c[1] for c in changes] == names[:2]
    assert sum(int(m.sum()) for m in sim.masks.values()) == kept
    for name, w in prunable_weights(sim.model).items():
        assert bool((w[~sim.masks[name]] == 0).all())
    assert history["test_acc"] == [[t, 50.0] for t in range(1, 9)]
    assert [b[0] for b in history["bytes"]] == list(range(1, 9))


def test_bytes_of_the_fixed_mask_arm():
    sim = small_sim(selection=0, progressive=False)
    sim.run(3)
    nnz = sum(int(m.sum()) for m in sim.masks.values())
    other = 4 + 4 + 3 + 4 + 4          # BN weight, bias, running mean, var; linear bias
    bitmap = math.ceil(36 / 8) + math.ceil(192 / 8)
    assert sim.bytes_sent == 4 * (4 * 3 * 2 * (nnz + other)) + 4 * bitmap
    dense = small_sim(density=1.0)
    dense.run(1)
    assert dense.masks is None and dense.bytes_sent == 4 * 2 * 4 * (36 + 192 + other)


def test_errors():
    clients = tiny_clients()
    model = tiny_cnn()
    with pytest.raises(ValueError, match="client 1 has no data"):
        FedTiny(model, [clients[0], (torch.zeros(0, 1, 6, 6), torch.zeros(0, dtype=torch.long))], 0.2)
    for kw, msg in [({"alpha": 1.5}, "Invalid alpha: 1.5"), ({"delta_rounds": 0}, "Invalid delta_rounds: 0"),
                    ({"lr": -1}, "Invalid lr: -1"), ({"selection": 10}, "Invalid selection: 10"),
                    ({"engine": "ray"}, "Invalid engine: 'ray'"), ({"end_fraction": 0}, "Invalid end_fraction: 0")]:
        with pytest.raises(ValueError, match=msg):
            FedTiny(model, clients, 0.2, **kw)
    for density in (0, 1.5):
        with pytest.raises(ValueError, match=f"Invalid density: {density}"):
            FedTiny(model, clients, density)
    with pytest.raises(ValueError, match="engine='distributed' needs an initialised"):
        FedTiny(model, clients, 0.2, engine="distributed")
    with pytest.raises(ValueError, match="Invalid rounds: 0"):
        FedTiny(model, clients, 0.2).run(0)
    with pytest.raises(ValueError, match="fewer than the 7 needed"):
        erk_densities(tiny_cnn(), 0.01)
