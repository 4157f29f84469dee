"""A longer fuzz run of every subcommand (issue 16 part 3): the strategies of tests/fuzz_inputs.py, N
examples shared among the input classes, every one run in this process under a time and memory limit.
Prints the counts by subcommand and class, and the first argv (with its files) of each distinct failure.

    python benchmarks/fuzz_cli.py --examples 5000 --seed 1
    python benchmarks/fuzz_cli.py --examples 300 --group "plan file" --keep /tmp/fuzz-repro

Exit status 1 when any run failed (traceback, hang, exit 0 on nonsense, ...), else 0.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import fuzz_inputs as fi
from hypothesis import HealthCheck, Phase, given, seed, settings


def fuzz_group(name: str, n: int, seed_value: int, root: Path, home: Path, keep: Path | None,
               progress: bool) -> fi.Tally:
    strategy, _ = fi.GROUPS[name]
    tally = fi.Tally()
    t0 = time.perf_counter()

    @seed(seed_value)
    @settings(max_examples=n, deadline=None, database=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(strategy())
    def body(case):
        with tempfile.TemporaryDirectory(dir=root) as d:
            outcomes = fi.run_case(case, Path(d), home)
            new = [o for o in outcomes if o.kind in fi.FAILURES and o.signature not in tally.first]
            tally.add(outcomes)
            if keep is not None and new:  # the files of each distinct failure's first example
                dest = keep / f"{len(list(keep.iterdir())):03d}"
                shutil.copytree(d, dest, symlinks=True, ignore_dangling_symlinks=True,
                                ignore=lambda _d, names: [x for x in names if not (Path(_d) / x).is_file()
                                                          and not (Path(_d) / x).is_dir()])
                (dest / "README.txt").write_text("\n\n".join(f"{o.signature}\n{o.detail}" for o in new) + "\n\n"
                                                 + case.describe(limit=2000) + f"\n{{D}} = {dest}\n")
        if progress and tally.examples % 100 == 0:
            print(f"  {name}: {tally.examples}/{n} examples, {tally.failures} failing runs, "
                  f"{time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)

    body()
    return tally


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--examples", type=int, default=5000, help="examples in all, shared by the groups' weights")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--group", action="append", choices=sorted(fi.GROUPS), help="only these groups")
    ap.add_argument("--hang-s", type=float, default=fi.HANG_S, help="seconds after which a run is a hang")
    ap.add_argument("--keep", type=Path, help="copy each distinct failure's files and argv here")
    ap.add_argument("--issue-cases", action="store_true", help="also run the issue's own findings once")
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    if args.examples <= 0:
        ap.error("--examples must be positive")
    fi.HANG_S = args.hang_s
    groups = args.group or list(fi.GROUPS)
    weight = sum(fi.GROUPS[g][1] for g in groups)
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
    total = fi.Tally()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="planner-fuzz-") as tmp:
        root, home = Path(tmp) / "work", Path(tmp) / "home"
        root.mkdir()
        home.mkdir()
        per_group = {}
        for g in groups:
            n = max(1, round(args.examples * fi.GROUPS[g][1] / weight))
            t = fuzz_group(g, n, args.seed, root, home, args.keep, not args.quiet)
            per_group[g] = t
            total.merge(t)
            if not args.quiet:
                print(f"{g}: {t.examples} examples, {t.runs} runs, {t.failures} failing", file=sys.stderr)
        if args.issue_cases:
            t = fi.Tally()
            for case in fi.issue_cases():
                with tempfile.TemporaryDirectory(dir=root) as d:
                    t.add(fi.run_case(case, Path(d), home))
            per_group["issue cases"] = t
            total.merge(t)
    wall = time.perf_counter() - t0
    print(f"# planner fuzz: {total.examples} examples, seed {args.seed}, hang limit {fi.HANG_S:g} s, "
          f"{wall:.0f} s wall\n")
    print(f"{'group':<14} {'examples':>8} {'runs':>6} {'s':>6} " + " ".join(f"{c:>{max(5, len(c))}}" for c in fi.CLASSES))
    for g, t in per_group.items():
        c = t.by_class()
        print(f"{g:<14} {t.examples:>8} {t.runs:>6} {t.seconds:6.1f} "
              + " ".join(f"{c[k]:>{max(5, len(k))}}" for k in fi.CLASSES))
    print("\nby subcommand:\n" + total.table())
    if total.first:
        print(f"\n{len(total.first)} distinct failures (by class, subcommand, exception type and innermost "
              "planner frame, or kind of nonsense), most frequent first:\n")
        print(total.report(limit=1000))
    return 1 if total.failures else 0


if __name__ == "__main__":
    sys.exit(main())
