"""The whole pipeline: `dvc repro` of the default (tiny) params in a fresh clone from scratch,
then a no-op `dvc repro` (nothing changed), three times: only the sources stage runs, which
hashes the local sources (cached by file stat).

    python -m bench.pipeline

Goal: the no-op under 3 s.
"""

from __future__ import annotations

import argparse
import re
import statistics
from pathlib import Path

from bench.measure import REPO, dvc, fresh_clone, machine, table, verdict


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/pipeline")
    args = parser.parse_args()
    clone = fresh_clone(args.workdir)
    full = dvc(clone, "repro")
    noops = [dvc(clone, "repro") for _ in range(3)]
    assert all(re.findall(r"Running stage '(\w+)'", m.output) == ["sources"] for m in noops)
    noop = statistics.median(m.seconds for m in noops)
    print(f"\n## dvc repro of the default params ({machine()})\n")
    print(table(["run", "seconds", "peak memory GiB (process tree)"],
                [["from scratch (9 stages)", full.seconds, full.peak_rss / 1024**3],
                 ["no-op (median of 3)", noop, max(m.peak_rss for m in noops) / 1024**3]]))
    print("\n## goals\n")
    print(verdict("no-op dvc repro seconds", noop, "< 3", noop < 3))


if __name__ == "__main__":
    main()
