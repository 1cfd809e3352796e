"""The ``normlab`` command line: list, show, bench (smoke), report, resume, errors."""

import json
import os
import signal
import subprocess
import sys
import time


from normlab.bench.runner import load_records
from normlab.cli import main


def test_list_formats(capsys):
    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert len(out.strip().splitlines()) == 30 and "layernorm" in out
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert len(rows) == 30 and {"slug", "status", "objects", "experiments", "verdicts"} <= set(rows[0])
    assert main(["list", "--markdown"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| method |") and len(table) == 32


def test_show_prints_docs_and_unknown_slug_exits_2(capsys):
    assert main(["show", "layernorm"]) == 0
    out = capsys.readouterr().out
    assert "Layer Normalization (2016)" in out and "arXiv:1607.06450" in out and "claim check layernorm" in out
    assert main(["show", "nosuch"]) == 2
    assert "valid: " in capsys.readouterr().err


def test_bench_unknown_id_and_unwritable_out_exit_2(tmp_path, capsys):
    assert main(["bench", "nosuch", "--smoke", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown experiment or slug 'nosuch'" in err and "layernorm" in err
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert main(["bench", "layernorm", "--smoke", "--out", str(blocker / "out")]) == 2
    assert "not writable" in capsys.readouterr().err


def test_smoke_bench_report_and_resume(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["bench", "layernorm", "--smoke", "--out", str(out)]) == 0
    records = load_records(out)
    assert len(records) >= 2 and {r["experiment"] for r in records} == {"layernorm"}
    assert (out / "report.md").exists() and any((out / "plots").glob("layernorm.*.png"))
    verdicts = json.loads((out / "verdicts.json").read_text())
    assert verdicts[0]["mode"] == "smoke" and verdicts[0]["status"] in ("report", "pass", "fail")
    (out / "report.md").unlink()
    assert main(["report", str(out)]) == 0
    assert "## layernorm" in (out / "report.md").read_text()
    before = [r["seconds"] for r in load_records(out)]
    assert main(["bench", "layernorm", "--smoke", "--out", str(out), "--resume"]) == 0
    assert [r["seconds"] for r in load_records(out)] == before
    assert main(["report", str(tmp_path / "empty")]) == 2


def test_killed_bench_keeps_finished_lines(tmp_path):
    """SIGKILL mid-run (full mode, several runs): every finished run is on disk and --resume completes it."""
    out = tmp_path / "killed"
    cmd = [sys.executable, "-m", "normlab.cli", "bench", "layernorm", "--smoke", "--seeds", "4", "--out", str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(load_records(out)) < 2:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = load_records(out)
    assert len(finished) >= 2
    assert main(["bench", "layernorm", "--smoke", "--seeds", "4", "--out", str(out), "--resume"]) == 0
    records = load_records(out)
    assert records[: len(finished)] == finished
    assert len({(r["arm"], r["lr"], r["seed"]) for r in records}) == len(records) == 8


def test_console_script_installed():
    exe = os.path.join(os.path.dirname(sys.executable), "normlab")
    result = subprocess.run([exe, "list"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0 and "pre_rmsnorm" in result.stdout
