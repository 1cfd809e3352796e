"""FedTiny on 2 gloo ranks equals the simulated run with the same seeds: the selection (pooled BN statistics,
candidate losses, chosen index) and one full round with a mask change (weights, buffers, masks, bytes), for
a contiguous and an interleaved client -> rank layout, in one spawn."""

from __future__ import annotations

import torch
from gloo import run_gloo
from torch import nn

from normlab.bench.experiment import intra_op_threads
from normlab.training.fedtiny import FedTiny

LAYOUTS = {"contiguous": [0, 0, 0, 1, 1], "interleaved": [0, 1, 0, 1, 0]}
SIZES = (20, 14, 17, 11, 9)


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 4 * 4, 3))


def make_clients() -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(1)
    return [(torch.randn(n, 1, 6, 6, generator=gen) + 0.5 * k, torch.randint(3, (n,), generator=gen))
            for k, n in enumerate(SIZES)]


def one_round(clients, **kw) -> dict:
    sim = FedTiny(make_model(), clients, 0.25, num_candidates=4, bn_batches=2, batch_size=6, lr=0.1,
                  delta_rounds=1, seed=7, **kw)
    sim.select()
    sim.train_round(1, 4)      # round 1 adjusts the first layer: top-K reports, prune and grow
    return {"state": sim.model.state_dict(), "masks": sim.masks, "selected": sim.selected,
            "losses": sim.candidate_losses, "bn": sim.selected_bn_stats, "bytes": sim.bytes_sent,
            "changes": sim.history["mask_changes"]}


def _rank_fn(rank: int, world_size: int) -> dict:
    torch.set_num_threads(1)
    out = {}
    for name, layout in LAYOUTS.items():
        clients = [c if layout[k] == rank else None for k, c in enumerate(make_clients())]
        out[name] = one_round(clients, engine="distributed", client_ranks=layout)
    return out


def test_two_gloo_ranks_equal_the_simulated_run():
    with intra_op_threads(1):          # the ranks run one thread; the same kernels give the same bits
        ref = one_round(make_clients())
    assert ref["changes"] and ref["changes"][0][:2] == [1, "0.weight"]
    results = run_gloo(_rank_fn, 2)
    for name in LAYOUTS:
        for got in (r[name] for r in results):
            assert got["selected"] == ref["selected"] and got["changes"] == ref["changes"]
            assert got["bytes"] == ref["bytes"]
            assert max(abs(a - b) for a, b in zip(got["losses"], ref["losses"])) <= 1e-6
            for layer, stats in ref["bn"].items():
                assert torch.allclose(got["bn"][layer].mean, stats.mean, rtol=0, atol=1e-6)
                assert torch.allclose(got["bn"][layer].var, stats.var, rtol=0, atol=1e-6)
                assert got["bn"][layer].count == stats.count
            for key, value in ref["state"].items():
                assert torch.allclose(got["state"][key].double(), value.double(), rtol=0, atol=1e-6), (name, key)
            assert all(torch.equal(got["masks"][k], m) for k, m in ref["masks"].items())
            # the design makes the two engines bit-identical, not just close
            assert all(torch.equal(got["state"][k], v) for k, v in ref["state"].items())
