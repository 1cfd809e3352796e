"""The catalog covers the 30 sheets, its names resolve, and its statuses are honest."""

from pathlib import Path

import pytest

import normlab
from normlab.bench.experiment import all_experiments
from normlab.catalog import KINDS, MethodEntry, get_method, list_methods

SHEETS = Path(__file__).resolve().parents[2] / "shared" / "methods"


def test_thirty_unique_entries():
    entries = list_methods()
    assert len(entries) == 30
    assert len({e.slug for e in entries}) == 30
    assert all(e.kinds and set(e.kinds) <= set(KINDS) and e.year > 2000 for e in entries)


@pytest.mark.skipif(not SHEETS.exists(), reason="the spec sheets live beside the repo, not in it")
def test_slugs_are_the_sheet_names():
    assert {e.slug for e in list_methods()} == {p.stem for p in SHEETS.glob("*.md")}


def test_objects_exist_and_experiments_are_registered():
    registered = all_experiments()
    for entry in list_methods():
        for name in entry.objects:
            assert any(hasattr(module, name) for module in (normlab, normlab.convert, normlab.optim,
                                                            normlab.attention, normlab.layers, normlab.functional,
                                                            normlab.analysis, normlab.explain, normlab.reparam,
                                                            normlab.training)
                       ), f"{entry.slug}: {name}"
        for exp in entry.experiments:
            assert exp in registered, f"{entry.slug}: experiment {exp} not registered"
        if entry.status != "planned":
            assert entry.objects and entry.experiments, entry.slug
    assert {e.slug for e in registered.values()} <= {e.slug for e in list_methods()}


def test_unknown_slug_and_bad_entries():
    assert get_method("layernorm").title == "Layer Normalization"
    with pytest.raises(KeyError, match="valid: .*layernorm"):
        get_method("batchnorm")
    with pytest.raises(ValueError, match="unknown kinds"):
        MethodEntry("x", "t", 2020, ("magic",))
    with pytest.raises(ValueError, match="unknown status"):
        MethodEntry("x", "t", 2020, ("layer",), status="done")
