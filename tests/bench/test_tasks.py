"""Shared data and the reference transformer."""

import math

import pytest
import torch
from torch import nn

import normlab
from normlab.bench.tasks import TinyTransformer, char_batch, char_corpus, corrupt_digits, digits


def test_char_corpus_vocab_and_splits():
    ascii_ids = char_corpus(5, "ascii128", "all")
    byte_ids = char_corpus(5, "bytes", "all")
    assert ascii_ids.dtype == torch.long and ascii_ids.max() <= 127 and byte_ids.max() <= 255
    assert len(ascii_ids) == len(byte_ids) > 10_000
    train, val = char_corpus(5, split="train"), char_corpus(5, split="val")
    assert torch.equal(torch.cat([train, val]), ascii_ids)
    text = bytes(ascii_ids[:2000].tolist()).decode("ascii")
    assert "import" in text or "def " in text
    with pytest.raises(ValueError, match="unknown vocab"):
        char_corpus(5, "utf8")
    with pytest.raises(ValueError, match="unknown split"):
        char_corpus(5, split="test")


def test_char_batch_targets_are_next_characters():
    ids = char_corpus(3)
    x, y = char_batch(ids, 4, 16, torch.Generator().manual_seed(0))
    assert x.shape == y.shape == (4, 16)
    assert torch.equal(x[:, 1:], y[:, :-1])
    x2, _ = char_batch(ids, 4, 16, torch.Generator().manual_seed(0))
    assert torch.equal(x, x2)


def test_digits_split_and_corruptions():
    x_train, y_train = digits("train")
    x_test, y_test = digits("test")
    assert x_train.shape[1:] == (1, 8, 8) and len(x_train) + len(x_test) == 1797
    assert 0 <= x_train.min() and x_train.max() <= 1 and set(y_test.tolist()) == set(range(10))
    noisy = corrupt_digits(x_test, "noise", 0.3)
    assert noisy.shape == x_test.shape and 0 <= noisy.min() and noisy.max() <= 1 and not torch.equal(noisy, x_test)
    masked = corrupt_digits(x_test, "mask", 3)
    assert ((masked == 0) | (masked == x_test)).all() and (masked == 0).sum() > (x_test == 0).sum()
    shifted = corrupt_digits(x_test, "shift", 0)
    assert torch.equal(shifted, x_test)
    shifted = corrupt_digits(x_test[:1], "shift", 2, seed=3)
    assert shifted.sum() <= x_test[:1].sum() + 1e-6
    with pytest.raises(ValueError, match="unknown corruption"):
        corrupt_digits(x_test, "blur", 1)


def test_shift_matches_a_hand_roll():
    img = torch.arange(64.0).reshape(1, 1, 8, 8)
    gen = torch.Generator().manual_seed(5)
    dy, dx = torch.randint(-2, 3, (1, 2), generator=gen)[0].tolist()
    expected = torch.zeros_like(img)
    for r in range(8):
        for c in range(8):
            if 0 <= r - dy < 8 and 0 <= c - dx < 8:
                expected[0, 0, r, c] = img[0, 0, r - dy, c - dx]
    assert torch.equal(corrupt_digits(img, "shift", 2, seed=5), expected)


class RecordingNorm(nn.LayerNorm):
    seen = []

    def forward(self, x, pad_mask=None, tau=None):
        RecordingNorm.seen.append((pad_mask is not None, tau is not None))
        return super().forward(x)


@pytest.mark.parametrize("placement", ["pre", "post"])
def test_transformer_shapes_slots_and_padding(placement):
    model = TinyTransformer(50, d_model=32, n_layers=2, n_heads=4, max_len=16, placement=placement,
                            norm_layer=RecordingNorm)
    idx = torch.randint(0, 50, (3, 10))
    assert model(idx).shape == (3, 10, 50)
    RecordingNorm.seen.clear()
    pad = torch.zeros(3, 10, dtype=torch.bool)
    pad[0, :3] = True  # True = padding (left padding, so causal queries see padded keys)
    out = model(idx, pad_mask=pad, tau=torch.zeros(3))
    assert RecordingNorm.seen and all(s == (True, True) for s in RecordingNorm.seen)
    assert out.shape == (3, 10, 50)
    other = idx.clone()  # attention ignores padded keys: changing them leaves real tokens alone
    other[0, :3] = (other[0, :3] + 1) % 50
    torch.testing.assert_close(model(other, pad_mask=pad)[0, 3:], model(idx, pad_mask=pad)[0, 3:])
    assert not torch.allclose(model(other)[0, 3:], model(idx)[0, 3:])
    with pytest.raises(ValueError, match="seq_len <= 16"):
        model(torch.zeros(1, 17, dtype=torch.long))


def test_transformer_is_causal_and_head_can_be_tied():
    model = TinyTransformer(20, d_model=16, n_layers=1, n_heads=2, max_len=8, norm_layer=normlab.RMSNorm,
                            tied_head=True)
    assert model.head.weight is model.tok_emb.weight
    idx = torch.randint(0, 20, (1, 8))
    changed = idx.clone()
    changed[0, -1] = (idx[0, -1] + 1) % 20
    torch.testing.assert_close(model(idx)[:, :-1], model(changed)[:, :-1])
    with pytest.raises(ValueError, match="placement"):
        TinyTransformer(20, placement="middle")


def test_transformer_initialisations():
    gpt = TinyTransformer(50, d_model=64, n_layers=2, max_len=16)
    ref = TinyTransformer(50, d_model=64, n_layers=2, max_len=16, init="torch")
    fc1 = gpt.blocks[0].mlp.fc1.weight
    assert abs(fc1.std().item() - 0.02) < 0.002
    assert abs(gpt.blocks[0].mlp.fc2.weight.std().item() - 0.02 / 2) < 0.001  # 0.02 / sqrt(2 n_layers)
    bound = 1 / math.sqrt(64)  # torch's Linear default: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    w = ref.blocks[0].mlp.fc1.weight
    assert w.abs().max().item() <= bound and abs(w.std().item() - bound / math.sqrt(3)) < 0.01
    assert abs(ref.tok_emb.weight.std().item() - 1.0) < 0.05  # Embedding default N(0, 1)
    with pytest.raises(ValueError, match="init must be 'gpt' or 'torch'"):
        TinyTransformer(50, init="xavier")
