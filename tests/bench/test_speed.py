"""The speed harness in quick mode: rows, keys, ratios, JSON, error rows, optimizer state bytes.

No timing thresholds: timings on 2 shared cores decide nothing. The compiled column uses the
``aot_eager`` backend here (inductor compiles only in ``normlab speed`` and slow tests).
"""

import json
import math

import pytest
import torch
from torch import nn

from normlab.bench import speed
from normlab.bench.speed import AttentionCase, LayerCase, OptimizerCase, format_table, run_speed

LAYER_KEYS = {"kind", "name", "baseline", "shape", "dtype", "threads", "note", "baseline_ms", "eager_ms",
              "compiled_ms", "copy_ms", "ratio_eager", "ratio_compiled", "copy_x_eager", "copy_x_compiled",
              "state_bytes", "rounds", "load_avg", "error"}
TIMES = ("baseline_ms", "eager_ms", "compiled_ms", "copy_ms", "ratio_eager", "ratio_compiled", "copy_x_eager",
         "copy_x_compiled")


@pytest.fixture(scope="module")
def rows():
    return run_speed(quick=True, backend="aot_eager")


def test_every_registered_row_is_present_with_the_expected_keys(rows):
    assert [r["name"] for r in rows] == [case.name for case in speed.all_cases()]
    for row in rows:
        assert set(row) == (LAYER_KEYS | {"hvps"} if row["kind"] == "hessian" else LAYER_KEYS)
        assert row["error"] is None, row
        assert row["threads"] == 2


def test_the_issue_rows_are_registered():
    names = [case.name for case in speed.all_cases()]
    for name in ("torch nn.LayerNorm", "normlab LayerNorm", "normlab RMSNorm", "normlab CRMSNorm",
                 "torch nn.RMSNorm", "torch nn.BatchNorm2d", "torch AdamW(foreach)", "torch SGD(momentum, foreach)"):
        assert name in names
    baselines = {case.name: speed.LAYER_BASELINES[case.baseline].name for case in speed.LAYER_CASES}
    assert baselines["normlab RMSNorm"] == "torch nn.LayerNorm"
    assert baselines["torch nn.BatchNorm2d"] == "torch nn.BatchNorm2d"


def test_ratios_and_multiples_are_positive_and_finite(rows):
    for row in rows:
        timed = TIMES if row["kind"] != "hessian" else ("baseline_ms", "eager_ms", "copy_ms", "ratio_eager",
                                                         "copy_x_eager")
        for key in timed:
            assert isinstance(row[key], float) and math.isfinite(row[key]) and row[key] > 0, (row["name"], key)
        assert row["rounds"] == speed.BUDGET["quick"][0]


def test_a_baseline_row_has_eager_ratio_one(rows):
    by_name = {r["name"]: r for r in rows}
    assert by_name["torch nn.LayerNorm"]["ratio_eager"] == 1.0
    assert by_name["torch AdamW(foreach)"]["ratio_eager"] == 1.0


def test_shapes_follow_the_mode_and_crmsnorm_takes_the_compressed_width(rows):
    by_name = {r["name"]: r for r in rows}
    assert by_name["normlab LayerNorm"]["shape"] == list(speed.SHAPES["token"]["quick"])
    token = speed.SHAPES["token"]["full"]
    crms = next(c for c in speed.LAYER_CASES if c.name == "normlab CRMSNorm")
    assert speed.input_shape(crms, quick=False) == (*token[:-1], token[-1] - 1) == (8, 256, 767)
    assert speed.input_shape(speed.LAYER_BASELINES["batchnorm2d"], quick=False) == (16, 64, 32, 32)


def test_rows_are_json_serialisable_and_the_table_lists_them(rows):
    assert json.loads(json.dumps(rows)) == rows
    table = format_table(rows)
    for row in rows:
        assert row["name"] in table


class Broken(nn.Module):
    def forward(self, x):
        raise RuntimeError("broken forward")


def failing_backend(graph_module, example_inputs):
    raise RuntimeError("cannot compile")


def test_a_failing_case_becomes_an_error_row_not_a_crash():
    cases = [LayerCase("broken", lambda c: Broken(), "token"),
             OptimizerCase("bad optimizer", lambda params: torch.optim.SGD(params, lr=-1.0)),
             LayerCase("normlab RMSNorm again", speed.RMSNorm, "token")]
    rows = run_speed(quick=True, cases=cases, backend="aot_eager")
    broken, bad_opt, fine = rows
    assert "broken forward" in broken["error"] and broken["ratio_eager"] is None
    assert "Invalid learning rate" in bad_opt["error"] and bad_opt["state_bytes"] is None
    assert fine["error"] is None and fine["ratio_eager"] > 0
    assert "ERROR" in format_table(rows)
    json.dumps(rows)


def test_a_compile_failure_keeps_the_eager_timing_and_reports_the_error():
    rows = run_speed(quick=True, cases=["normlab RMSNorm", "torch SGD(momentum, foreach)"], backend=failing_backend)
    for row in rows:
        assert row["error"].startswith("compile (failing_backend)") and "cannot compile" in row["error"]
        assert row["ratio_compiled"] is None and row["copy_x_compiled"] is None
        assert row["ratio_eager"] > 0 and row["copy_x_eager"] > 0
    json.dumps(rows)


def test_cases_can_be_selected_by_name_and_unknown_names_raise():
    (row,) = run_speed(quick=True, cases=["torch SGD(momentum, foreach)"], backend="aot_eager")
    assert row["kind"] == "optimizer" and row["baseline"] == "torch AdamW(foreach)"
    with pytest.raises(KeyError, match="unknown speed case"):
        run_speed(quick=True, cases=["no such row"])


def test_adamw_state_bytes_are_two_moments_per_parameter_plus_step(rows):
    params = list(speed.mlp(quick=True).parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    step_bytes = len(params) * torch.tensor(0.0).element_size()  # AdamW keeps `step` as a float32 scalar
    by_name = {r["name"]: r for r in rows}
    assert by_name["torch AdamW(foreach)"]["state_bytes"] == 2 * param_bytes + step_bytes
    assert by_name["torch SGD(momentum, foreach)"]["state_bytes"] == param_bytes


def test_the_full_mode_mlp_has_about_ten_million_parameters():
    widths = speed.MLP_WIDTHS["full"]
    count = widths[0] * widths[1] + widths[1] + widths[1] * widths[2] + widths[2]
    assert 9e6 < count < 12e6


def test_setup_layer_is_the_shared_setup_of_a_case():
    case = next(c for c in speed.LAYER_CASES if c.name == "torch nn.BatchNorm2d")
    module, x, dy = speed.setup_layer(case, quick=True)
    assert module.training and x.requires_grad and x.shape == dy.shape == speed.SHAPES["conv"]["quick"]
    assert module.num_features == x.shape[1]


def test_attention_rows_time_nala_against_sdpa_at_the_issue_lengths(rows):
    cases = {case.name: case for case in speed.ATTENTION_CASES}
    assert {cases[f"normlab nala_attention N={n}"].seq_len for n in (512, 2048, 8192)} == {512, 2048, 8192}
    by_name = {r["name"]: r for r in rows}
    for name, case in cases.items():
        row = by_name[name]
        assert row["kind"] == "attention" and row["error"] is None
        assert row["baseline"] == ("torch SDPA is_causal" if case.causal else "torch SDPA")
        assert row["shape"] == [*speed.ATTENTION_DIMS["quick"][:2], speed.ATTENTION_QUICK_LEN,
                                speed.ATTENTION_DIMS["quick"][2]]
        assert speed.attention_shape(case, quick=False) == (1, 4, case.seq_len, 32)
    assert cases["normlab nala_attention causal N=2048"].causal
    assert "1x2x16x8" in format_table(rows)


def test_setup_attention_is_the_shared_setup_of_a_case():
    case = speed.ATTENTION_CASES[0]
    (q, k, v), dy = speed.setup_attention(case, quick=True)
    assert all(t.requires_grad and t.shape == dy.shape == (1, 2, 16, 8) for t in (q, k, v))
    assert not torch.equal(q, k)
    grads = torch.autograd.grad(case.fn(q, k, v), (q, k, v), dy)
    assert all(torch.isfinite(g).all() for g in grads)


def test_a_failing_attention_case_becomes_an_error_row():
    def broken(q, k, v, causal=False):
        raise RuntimeError("broken attention")

    (row,) = run_speed(quick=True, cases=[AttentionCase("broken attention", broken, 64)], backend="aot_eager")
    assert row["kind"] == "attention" and "broken attention" in row["error"] and row["ratio_eager"] is None
    assert "ERROR" in format_table([row])


def test_run_speed_restores_the_thread_count():
    before = torch.get_num_threads()
    run_speed(quick=True, cases=["torch nn.BatchNorm2d"], backend="aot_eager")
    assert torch.get_num_threads() == before


def test_the_hessian_row_counts_hvps_to_the_top_eigenvalue(rows):
    (row,) = [r for r in rows if r["kind"] == "hessian"]
    assert row["shape"] == [64 * 8 + 8 + 8 * 10 + 10] and row["compiled_ms"] is None
    assert set(row["hvps"]) == {"power", "lanczos"} and all(n >= 1 for n in row["hvps"].values())
    assert "HVPs to the top eigenvalue within 1e-3: power" in format_table([row])


def test_a_zeroth_order_row_steps_through_its_closure(rows):
    """ZOAdam's row passes the case's closure to every step: two float32 moments of every parameter (int step)."""
    case = next(c for c in speed.OPTIMIZER_CASES if c.name == "normlab ZOAdam")
    assert case.make_closure is not None
    params = list(speed.mlp(quick=True).parameters())
    param_bytes = sum(p.numel() * p.element_size() for p in params)
    row = next(r for r in rows if r["name"] == case.name)
    assert row["error"] is None and row["state_bytes"] == 2 * param_bytes
    opt, params = speed.setup_optimizer(case, quick=True)
    before = [p.detach().clone() for p in params]
    speed.optimizer_step(case, opt, params)()
    assert any(not torch.equal(p, b) for p, b in zip(params, before))
