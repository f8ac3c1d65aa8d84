"""The whole pipeline: `dvc repro` of the default (tiny) params from scratch in a fresh clone,
and a no-op `dvc repro` (nothing changed: only the sources stage runs, which hashes the local
sources, cached by file stat).

    python -m bench.pipeline [--repeats 3] [--noop-repeats 5]

From scratch: `--repeats` fresh clones, one after another (the first run on this machine also
fills the OS file cache; it is reported, not dropped, as a user's first run pays it too, and
the range shows it). No-op: one untimed warm-up, then `--noop-repeats` runs. Figures are
medians with their range. Goal: the no-op under 3 s.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

from bench.measure import GIB, REPO, dvc, fresh_clone, header, interleaved, median, spread, table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--noop-repeats", type=int, default=5)
    parser.add_argument("--workdir", type=Path, default=REPO / "bench/.work/pipeline")
    args = parser.parse_args()
    clones = iter(range(100))

    def from_scratch() -> dict:
        measured = dvc(fresh_clone(args.workdir / f"clone-{next(clones)}"), "repro")
        stages = re.findall(r"Running stage '(\w+)'", measured.output)
        return {"seconds": measured.seconds, "peak_rss": measured.peak_rss, "stages": len(stages)}

    full = interleaved({"from scratch": from_scratch}, args.repeats, warmup=False)["from scratch"]
    clone = args.workdir / "clone-0"

    def noop() -> dict:
        measured = dvc(clone, "repro")
        assert re.findall(r"Running stage '(\w+)'", measured.output) == ["sources"], measured.output
        return {"seconds": measured.seconds, "peak_rss": measured.peak_rss}

    noops = interleaved({"no-op": noop}, args.noop_repeats)["no-op"]
    print(header(f"dvc repro of the default params, median (range) of {args.repeats} runs from scratch and "
                 f"{args.noop_repeats} no-op runs after a warm-up",
                 f"python -m bench.pipeline --repeats {args.repeats} --noop-repeats {args.noop_repeats}"))
    print(table(["run", "seconds", "peak memory GiB (process tree)"],
                [[f"from scratch ({full[0]['stages']} stages)", spread(full, "seconds"), spread(full, "peak_rss", GIB)],
                 ["no-op", spread(noops, "seconds"), spread(noops, "peak_rss", GIB)]]))
    noop_s = median(noops, "seconds")
    print("\n## goals\n")
    print(f"- no-op dvc repro seconds: {spread(noops, 'seconds')} (goal < 3): {'MET' if noop_s < 3 else 'NOT MET'}")


if __name__ == "__main__":
    main()
