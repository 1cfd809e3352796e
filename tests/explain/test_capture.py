import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.explain._capture import (LayerCapture, at_least_float32, check_images, eval_mode, normalize_max,
                                      normalize_minmax, resolve_layer, resolve_layers, select_target,
                                      target_score, upsample)


def tiny_cnn(inplace: bool = False, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=inplace), nn.Conv2d(4, 6, 3, padding=1),
                         nn.BatchNorm2d(6), nn.ReLU(inplace=inplace), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                         nn.Dropout(0.5), nn.Linear(6, 5))


def images(n=3, seed=1):
    return torch.rand(n, 1, 6, 6, generator=torch.Generator().manual_seed(seed))


def test_resolve_layer_by_name_and_module():
    model = tiny_cnn()
    assert resolve_layer(model, "2") == ("2", model[2])
    assert resolve_layer(model, model[4]) == ("4", model[4])
    assert [n for n, _ in resolve_layers(model, ["0", model[2]])] == ["0", "2"]


def test_resolve_layer_errors():
    model = tiny_cnn()
    with pytest.raises(ValueError, match="'conv9' is not in the model"):
        resolve_layer(model, "conv9")
    with pytest.raises(ValueError, match="not a submodule"):
        resolve_layer(model, nn.Conv2d(1, 1, 1))
    with pytest.raises(TypeError, match="module name"):
        resolve_layer(model, 3)
    with pytest.raises(ValueError, match="at least one"):
        resolve_layers(model, [])
    with pytest.raises(ValueError, match="distinct"):
        resolve_layers(model, ["0", model[0]])


def test_captures_output_and_its_gradient():
    model = tiny_cnn().double()
    x = images().double()
    with LayerCapture(model, ["1", "4"]) as cap:
        logits, target, acts, grads = cap.run(x)
    # Reference: the same computation split by hand.
    model.eval()
    a1 = model[1](model[0](x))
    a4 = model[4](model[3](model[2](a1)))
    ref_logits = model[8](model[7](model[6](model[5](a4))))
    assert torch.equal(target, ref_logits.argmax(1))
    g1, g4 = torch.autograd.grad(ref_logits.gather(1, target[:, None]).sum(), [a1, a4])
    torch.testing.assert_close(logits, ref_logits.detach())
    torch.testing.assert_close(acts[0], a1.detach())
    torch.testing.assert_close(acts[1], a4.detach())
    torch.testing.assert_close(grads[0], g1)
    torch.testing.assert_close(grads[1], g4)


def test_inplace_relu_after_the_layer_does_not_corrupt_the_capture():
    model = tiny_cnn(inplace=True).double().eval()
    x = images().double()
    with LayerCapture(model, "0") as cap:
        _, target, (act,), (grad,) = cap.run(x, 2)
    ref = tiny_cnn(inplace=False).double().eval()
    ref.load_state_dict(model.state_dict())
    z = ref[0](x)  # the conv output, before the ReLU
    logits = ref[1:](z)
    (gz,) = torch.autograd.grad(logits[:, 2].sum(), z)
    assert (z < 0).any()  # the ReLU would have changed it
    torch.testing.assert_close(act, z.detach())
    torch.testing.assert_close(grad, gz)


def test_eval_mode_forced_and_every_flag_restored():
    model = tiny_cnn().train()
    model[3].eval()  # a mixed state must come back as it was
    seen = []
    model[5].register_forward_hook(lambda m, i, o: seen.append([mod.training for mod in model.modules()]))
    with LayerCapture(model, "2") as cap:
        cap.run(images())
    assert seen and not any(seen[0])
    assert [m.training for m in model.modules()] == [True, True, True, True, False, True, True, True, True, True]


def test_hooks_removed_and_state_restored_on_error():
    model = tiny_cnn().train()
    with pytest.raises(ValueError, match="4-D"):
        with LayerCapture(model, "8") as cap:  # the Linear head: no spatial dims
            cap.run(images())
    with pytest.raises(RuntimeError, match="boom"):
        with LayerCapture(model, "2"):
            raise RuntimeError("boom")
    assert all(not m._forward_hooks for m in model.modules())
    assert all(m.training for m in model.modules())


def test_parameters_grad_and_requires_grad_untouched():
    model = tiny_cnn()
    model[0].weight.grad = torch.ones_like(model[0].weight)
    model[2].bias.requires_grad_(False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with LayerCapture(model, "2") as cap:
        cap.run(images())
    assert torch.equal(model[0].weight.grad, torch.ones_like(model[0].weight))
    assert model[2].weight.grad is None and not model[2].bias.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_batched_equals_per_sample():
    model = tiny_cnn()
    x = images(4)
    with LayerCapture(model, "4") as cap:
        _, t, (a,), (g,) = cap.run(x)
        singles = [cap.run(x[i:i + 1], t[i:i + 1]) for i in range(4)]
    torch.testing.assert_close(a, torch.cat([s[2][0] for s in singles]))
    torch.testing.assert_close(g, torch.cat([s[3][0] for s in singles]), atol=1e-7, rtol=1e-5)


def test_run_outside_the_block_and_bad_input():
    cap = LayerCapture(tiny_cnn(), "2")
    with pytest.raises(RuntimeError, match="inside"):
        cap.run(images())
    with LayerCapture(tiny_cnn(), "2") as cap:
        with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
            cap.run(torch.rand(1, 6, 6))
        with pytest.raises(TypeError, match="floating"):
            cap.run(torch.ones(1, 1, 6, 6, dtype=torch.long))
    with pytest.raises(TypeError):
        check_images([1.0])


def test_layer_not_run_or_run_twice():
    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 1, 1)
            self.unused = nn.Conv2d(1, 1, 1)
            self.head = nn.Linear(1, 2)

        def forward(self, x):
            return self.head(self.conv(self.conv(x)).mean((2, 3)))

    model = Twice()
    with LayerCapture(model, "unused") as cap, pytest.raises(ValueError, match="did not run"):
        cap.run(images())
    with LayerCapture(model, "conv") as cap, pytest.raises(ValueError, match="more than once"):
        cap.run(images())


def test_select_target():
    logits = torch.tensor([[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]])
    assert select_target(logits, None).tolist() == [1, 0]
    assert select_target(logits, 2).tolist() == [2, 2]
    assert select_target(logits, torch.tensor([0, 2], dtype=torch.int32)).dtype == torch.long
    assert target_score(logits, torch.tensor([2, 0])).item() == 4.0
    with pytest.raises(ValueError, match="0..2"):
        select_target(logits, 3)
    with pytest.raises(ValueError, match="shape"):
        select_target(logits, torch.tensor([0]))
    with pytest.raises(ValueError, match="integer"):
        select_target(logits, torch.tensor([0.0, 1.0]))
    with pytest.raises(TypeError, match="target"):
        select_target(logits, True)


def test_upsample_is_bilinear_half_pixel():
    m = torch.rand(2, 1, 3, 4)
    torch.testing.assert_close(upsample(m, (6, 8)),
                               F.interpolate(m, size=(6, 8), mode="bilinear", align_corners=False))
    assert upsample(m, (3, 4)) is m


def test_normalizations():
    m = torch.tensor([[[[1.0, 3.0], [2.0, 5.0]]], [[[4.0, 4.0], [4.0, 4.0]]], [[[-1.0, -2.0], [-3.0, -4.0]]]])
    mm = normalize_minmax(m)
    torch.testing.assert_close(mm[0], torch.tensor([[[0.0, 0.5], [0.25, 1.0]]]))
    assert torch.equal(mm[1], torch.zeros(1, 2, 2))
    torch.testing.assert_close(mm[2], torch.tensor([[[1.0, 2 / 3], [1 / 3, 0.0]]]))
    mx = normalize_max(m)
    torch.testing.assert_close(mx[0], m[0] / 5)
    assert torch.equal(mx[1], torch.ones(1, 2, 2)) and torch.equal(mx[2], torch.zeros(1, 2, 2))
    assert not mm.isnan().any() and not mx.isnan().any()


def test_helpers_dtype_and_eval_mode():
    assert at_least_float32(torch.ones(1, dtype=torch.bfloat16)).dtype == torch.float32
    assert at_least_float32(torch.ones(1, dtype=torch.float64)).dtype == torch.float64
    model = tiny_cnn().train()
    with pytest.raises(KeyError):
        with eval_mode(model):
            assert not model.training
            raise KeyError
    assert model.training
