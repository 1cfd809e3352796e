"""The README's method table is the catalog's, and its quickstart is what CI runs."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_method_table_is_generated_from_the_catalog():
    spec = importlib.util.spec_from_file_location("update_readme", ROOT / "scripts" / "update_readme.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    readme = (ROOT / "README.md").read_text()
    assert module.updated(readme) == readme, "README table is stale: run `make readme`"


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make bench" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()


def test_api_tour_runs(capsys):
    import re

    readme = (ROOT / "README.md").read_text()
    (tour,) = re.findall(r"```python\n(.*?)```", readme, re.S)
    exec(compile(tour, "README.md", "exec"), {})
    assert "layernorm verified" in capsys.readouterr().out
