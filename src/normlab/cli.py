"""``normlab list | show | bench | report | speed``."""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
from collections.abc import Sequence

from .catalog import get_method, list_methods

EXIT_USAGE = 2


def _verdict_cell(entry, verdicts) -> str:
    found = [f"{exp}: {verdicts[exp]['status']}" for exp in entry.experiments if exp in verdicts]
    return ", ".join(found) if found else "-"


def cmd_list(args) -> int:
    from .bench.report import committed_verdicts

    verdicts = committed_verdicts()
    entries = list_methods()
    if args.json:
        rows = [{"slug": e.slug, "title": e.title, "year": e.year, "kinds": list(e.kinds),
                 "objects": list(e.objects), "experiments": list(e.experiments), "status": e.status, "note": e.note,
                 "verdicts": {x: verdicts[x]["status"] for x in e.experiments if x in verdicts}} for e in entries]
        print(json.dumps(rows, indent=2))
    elif args.markdown:
        print("| method | paper | year | kind | objects | status | claim check (full mode) |")
        print("|---|---|---|---|---|---|---|")
        for e in entries:
            objects = ", ".join(f"`{o}`" for o in e.objects) or "-"
            status = f"{e.status} ({e.note})" if e.note else e.status
            print(f"| {e.slug} | {e.title} | {e.year} | {', '.join(e.kinds)} | {objects} | {status} | "
                  f"{_verdict_cell(e, verdicts)} |")
    else:
        width = max(len(e.slug) for e in entries)
        for e in entries:
            print(f"{e.slug:<{width}}  {e.status:<11}  {e.year}  {', '.join(e.kinds):<22}  {e.title}")
    return 0


def _object_modules(names: Sequence[str]) -> list:
    """The modules defining the catalog entry's public objects (looked up in normlab, then its subpackages)."""
    import normlab

    modules = []
    for name in names:
        packages = (normlab, normlab.convert, normlab.layers, normlab.functional, normlab.analysis, normlab.explain,
                    normlab.reparam, normlab.training)
        obj = next((getattr(m, name) for m in packages if hasattr(m, name)), None)
        module = inspect.getmodule(obj) if obj is not None else None
        if module is not None and module not in modules:
            modules.append(module)
    return modules


def cmd_show(args) -> int:
    from .bench.report import committed_verdicts

    try:
        entry = get_method(args.slug)
    except KeyError as exc:
        print(f"normlab show: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    print(f"{entry.slug}: {entry.title} ({entry.year})")
    print(f"kinds: {', '.join(entry.kinds)}   status: {entry.status}")
    print(f"objects: {', '.join(entry.objects) or '-'}")
    if entry.note:
        print(f"note: {entry.note}")
    verdicts = committed_verdicts()
    for exp in entry.experiments:
        v = verdicts.get(exp)
        print(f"claim check {exp}: " + (f"{v['status']} ({v['date']}, {v['machine']}): {v['summary']}" if v
                                        else "no committed full-mode verdict"))
    for module in _object_modules(entry.objects):
        print(f"\n--- {module.__name__} ---\n{inspect.getdoc(module) or ''}")
    return 0


def cmd_bench(args) -> int:
    from .bench.experiment import select
    from .bench.report import build_report
    from .bench.runner import run_experiments

    try:
        experiments = select(args.ids)
    except KeyError as exc:
        print(f"normlab bench: {exc.args[0]}", file=sys.stderr)
        return EXIT_USAGE
    mode = "quick" if args.quick else "smoke" if args.smoke else "full"
    try:
        verdicts = run_experiments(experiments, mode, args.out, n_seeds=args.seeds, resume=args.resume)
    except (OSError, ValueError) as exc:
        print(f"normlab bench: {exc}", file=sys.stderr)
        return EXIT_USAGE
    build_report(args.out)
    for v in verdicts:
        print(f"{v['experiment']:<24} {v['status']:<8} {v['summary']}")
    print(f"report: {args.out}/report.md")
    return 0


def cmd_report(args) -> int:
    from .bench.report import build_report

    try:
        verdicts = build_report(args.dir)
    except (OSError, FileNotFoundError) as exc:
        print(f"normlab report: {exc}", file=sys.stderr)
        return EXIT_USAGE
    for v in verdicts:
        print(f"{v['experiment']:<24} {v['mode']:<6} {v['status']:<8} {v['summary']}")
    print(f"report: {args.dir}/report.md")
    return 0


def cmd_speed(args) -> int:
    from .bench.speed import format_table, run_speed

    rows = run_speed(quick=args.quick, progress=True)  # the bar goes to stderr: --json output stays clean
    print(json.dumps(rows, indent=2) if args.json else format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="normlab", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("list", help="the 30 methods with status and committed verdicts")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--markdown", action="store_true", help="the README method table")
    p.set_defaults(func=cmd_list)

    p = sub.add_parser("show", help="one method: its documentation, status and verdicts")
    p.add_argument("slug")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("bench", help="run claim checks (all, or the named ids or slugs)")
    p.add_argument("ids", nargs="*")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="about 12 s per check, indicative verdicts")
    mode.add_argument("--smoke", action="store_true", help="a few steps, for tests")
    p.add_argument("--seeds", type=int, default=None, help="run seeds 0..N-1 instead of the mode's seeds")
    p.add_argument("--out", default="bench-out", help="output folder (default: bench-out)")
    p.add_argument("--resume", action="store_true", help="skip runs already in OUT/records.jsonl")
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("report", help="rebuild report.md, plots and verdicts from DIR/records.jsonl")
    p.add_argument("dir")
    p.set_defaults(func=cmd_report)

    p = sub.add_parser("speed", help="speed and memory against the torch baselines")
    p.add_argument("--json", action="store_true")
    p.add_argument("--quick", action="store_true", help="tiny shapes, for a fast look")
    p.set_defaults(func=cmd_speed)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except BrokenPipeError:  # `normlab list | head`: the reader left; say nothing more
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
