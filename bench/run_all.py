"""Run every benchmark script in turn and collect their results in bench/results/.

Each script runs in its own process, one after the other, so that no two benchmarks share the
machine. The combined results go to bench/results/all.json and bench/results/summary.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import benchlib as lib

SCRIPTS = (
    "reaction",
    "oneshot",
    "validity_size",
    "footprint",
    "trainer_cost",
    "burst",
    "highwater",
)


def main(argv=None) -> int:
    args = lib.parse_args(__doc__.splitlines()[0], argv)
    options = ["--tmp", args.tmp, "--results", str(lib.RESULTS)]
    options += ["--quick"] if args.quick else []
    statuses = {}
    durations = {}
    for name in SCRIPTS:
        started = time.monotonic()
        result = subprocess.run(
            [lib.PYTHON, str(lib.REPO / "bench" / f"{name}.py"), *options],
            cwd=lib.REPO,
            check=False,
        )
        statuses[name] = result.returncode
        durations[name] = round(time.monotonic() - started, 1)
        print(f"{name}: exit status {result.returncode} after {durations[name]} s", flush=True)

    combined = {"quick": args.quick, "statuses": statuses, "durations": durations}
    sections = ["# Benchmark results", ""]
    for name in SCRIPTS:
        json_path = lib.RESULTS / f"{name}.json"
        markdown_path = lib.RESULTS / f"{name}.md"
        if statuses[name] == 0 and json_path.exists():
            combined[name] = json.loads(json_path.read_text())
            sections += [markdown_path.read_text(), ""]
        else:
            sections += [f"## {name}", "", f"Failed with exit status {statuses[name]}.", ""]
    lib.RESULTS.mkdir(parents=True, exist_ok=True)
    (lib.RESULTS / "all.json").write_text(json.dumps(combined, indent=2, default=str) + "\n")
    (lib.RESULTS / "summary.md").write_text("\n".join(sections))
    return 1 if any(statuses.values()) else 0


if __name__ == "__main__":
    sys.exit(main())
