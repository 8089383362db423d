"""Regenerate the README's main-job table: run ``ptqlab demo`` and write its output into README.md.

The block between ``<!-- demo-table -->`` and ``<!-- /demo-table -->`` (the sentence with the measured time and
the fenced output) is written by this script only; do not edit it by hand.

    PTQLAB_DATA=../shared/data python scripts/readme_table.py            # runs the demo (~5 min on 2 idle cores)
    python scripts/readme_table.py --from-output demo.txt                # use an output already printed

The demo's ``data:`` line (local paths) is left out of the README.  Any further arguments after ``--`` go to
``ptqlab demo`` (for example ``-- --model testbed-bloom``).
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
START, END = "<!-- demo-table -->", "<!-- /demo-table -->"


def run_demo(extra: list[str]) -> tuple[str, float]:
    """The demo's stdout and its wall time in seconds (same interpreter, this checkout first on the path)."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    t0 = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "ptqlab.cli", "demo", "--no-progress", *extra], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, text=True, check=False)
    elapsed = time.perf_counter() - t0
    if done.returncode != 0:
        sys.stdout.write(done.stdout)
        raise SystemExit(f"ptqlab demo failed (exit status {done.returncode}); README left as it was")
    return done.stdout, elapsed


def table_lines(output: str) -> list[str]:
    """The demo's summary (from the ``model ...`` line on), without the ``data:`` line, trailing spaces removed."""
    lines = [line.rstrip() for line in output.splitlines()]
    starts = [i for i, line in enumerate(lines) if line.startswith("model ")]
    if not starts:
        raise SystemExit("no 'model ...' line in the demo's output: is it the output of ptqlab demo?")
    kept = [line for line in lines[starts[-1]:] if not line.startswith("data: ")]
    rule = next((i for i, line in enumerate(kept) if line.startswith("-----")), None)
    if rule is None:
        raise SystemExit("no table in the demo's output")
    # the table ends at the first line that is not a row (rows end with the run's time in seconds)
    end = next((i for i in range(rule + 1, len(kept)) if not re.search(r"\s\d+(\.\d+)?$", kept[i])), len(kept))
    return kept[:end]


def block(lines: list[str], minutes: float | None, cores: int) -> str:
    where = "a GPU" if " on cuda" in lines[0] else f"a {cores}-core CPU"
    took = f"took {minutes:.1f} min on {where}" if minutes is not None else f"ran on {where}"
    return "\n".join([
        START,
        f"The main job, `ptqlab demo`, {took} (on a GPU it evaluates the full splits) and printed",
        "(this block is written by `python scripts/readme_table.py`, which runs the demo; do not edit it by hand):",
        "",
        "```",
        *lines,
        "```",
        END,
    ])


def rewrite(readme: Path, new_block: str) -> None:
    text = readme.read_text()
    pattern = re.compile(re.escape(START) + r".*?" + re.escape(END), re.S)
    if len(pattern.findall(text)) != 1:
        raise SystemExit(f"{readme}: expected exactly one {START} ... {END} block")
    readme.write_text(pattern.sub(lambda _: new_block, text))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--readme", type=Path, default=ROOT / "README.md")
    p.add_argument("--from-output", type=Path, default=None,
                   help="take the table from this saved demo output instead of running the demo")
    p.add_argument("--minutes", type=float, default=None,
                   help="with --from-output: the demo's measured wall time, for the sentence")
    p.add_argument("--dry-run", action="store_true", help="print the block, leave the README alone")
    a = p.parse_args(argv)
    cores = os.cpu_count() or 1
    if a.from_output:
        output, minutes = a.from_output.read_text(), a.minutes
    else:
        output, seconds = run_demo(extra)
        minutes = seconds / 60
        print(output, end="")
        print(f"demo wall time {seconds:.0f} s")
    new_block = block(table_lines(output), minutes, cores)
    if a.dry_run:
        print(new_block)
    else:
        rewrite(a.readme, new_block)
        print(f"{a.readme}: demo table rewritten")
    return 0


if __name__ == "__main__":
    sys.exit(main())
