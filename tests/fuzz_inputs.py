"""Hostile inputs for every subcommand (issue 16 part 3): hypothesis strategies, and the in-process runner
that judges what `planner.app.cli.main` did with each. Shared by tests/test_fuzz_cli.py (CI, >= 1,000 examples)
and benchmarks/fuzz_cli.py (longer runs, counts by class and subcommand).

A strategy draws a `Case`: the argv of one or more runs, the files they name (written into a fresh folder
per example; "{D}" in an argv stands for that folder), and, when the input is nonsense in the strict sense
of the issue, why. Nonsense is only what the issue lists (hostile numbers, booleans or yes/false strings in
number or boolean fields, MoE layers past the last layer, empty or deeply nested files, wrong types, a
misspelled name, a plan that contradicts its own cluster or batch, values past the cost model's caps,
FIFOs, devices, directories and unreadable or oversized files); a mutation that may well be valid (another
power of two, a catalog name) leaves the case unmarked, and then any clean outcome is accepted.

Outcome classes (`CLASSES`): ok, refused (exit 1 or 2 with exactly one stderr line "error: ..."), and the
failures: traceback (an exception escaped main), hang (over HANG_S seconds), nonsense-accepted (exit 0 on
input marked nonsense, or a torch launch reached with it), bad-refusal (exit 1/2 without exactly one
"error: " line, or another exit status), impossible-output (exit 0 but MFU > 1, tokens/s <= 0 or not
finite, an infeasible plan, a claimed output file that is not there or lost its mode), flood (over
FLOOD_BYTES on stdout), warning (a Python warning reached the user), debris (a temporary file left beside
an output) and rows-lost (backtest: a bad cell took good rows, or the whole report, with it).
"""
from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import re
import resource
import signal
import stat
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

import yaml
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# A run past this is a hang (the slowest legitimate run drawn here takes under 2 s on a 2-core machine).
HANG_S = float(os.environ.get("PLANNER_FUZZ_HANG_S", "20"))
# Address space a run may add before it gets MemoryError (so --nodes 10^9 is a traceback, not a dead host).
MEMORY_HEADROOM_BYTES = int(float(os.environ.get("PLANNER_FUZZ_MEM_GB", "3")) * 2**30)
# stdout past this is a flood (`simulate --json` of 10^6 micro-batches wrote 478 MB).
FLOOD_BYTES = 64 * 2**20

# Caps the issue names ("devices <= 10^6, sequence <= 2^24, micro-batches per step <= 10^5"): a value past
# one is nonsense. SURELY_NOT_A_SIZE: no size field of a model or cluster is anywhere near 2^40.
MAX_DEVICES = 10**6
MAX_SEQ = 2**24
MAX_MICROBATCHES = 10**5
SURELY_NOT_A_SIZE = 2**40

FAILURES = ("traceback", "hang", "nonsense-accepted", "bad-refusal", "impossible-output", "flood", "warning",
            "debris", "rows-lost")
CLASSES = ("ok", "refused") + FAILURES


# ---------------------------------------------------------------------------------------------------
# Cases


@dataclass(frozen=True)
class FileSpec:
    """A path an example needs, made in its folder: kind file (data), dir, fifo, chardev (a null device
    made with mknod in the folder, never a real /dev entry), loop (a symlink to itself), unreadable (mode
    000), big (over the 16 MiB input cap)."""

    name: str
    kind: str = "file"
    data: bytes = b""
    mode: int | None = None


@dataclass(frozen=True)
class Case:
    group: str
    runs: tuple[tuple[str, ...], ...]
    files: tuple[FileSpec, ...] = ()
    nonsense: str = ""  # why every run of this case must be refused ("" = it may be valid)
    oracle: str = ""  # "plan-file": later runs must refuse what the first (estimate --plan) refused with 2;
    # "backtest": rows in bad_ids never predicted, rows in good_ids predicted as in the unmutated table
    bad_ids: tuple[str, ...] = ()
    bad_reasons: tuple[str, ...] = ()  # why each bad row is nonsense
    good_ids: tuple[str, ...] = ()
    cells_only: bool = False  # backtest: only cells changed, so the report itself must still come out
    output: str = ""  # a file an exit-0 run must leave behind ("{D}/..."), with output_mode if given
    output_mode: int | None = None
    run_nonsense: tuple[str, ...] = ()  # nonsense of one run only (by index), on top of `nonsense`

    def describe(self, limit: int = 400) -> str:
        """argv and files, enough to reproduce the example by hand."""
        lines = ["$ planner " + " ".join(_shell(a) for a in run) for run in self.runs]
        for f in self.files:
            if f.kind == "file":
                shown = f.data[:limit]
                more = f" ... ({len(f.data):,} bytes)" if len(f.data) > limit else ""
                lines.append(f"  {{D}}/{f.name}: {shown!r}{more}")
            else:
                lines.append(f"  {{D}}/{f.name}: <{f.kind}>")
        for why in (self.nonsense, *self.run_nonsense):
            if why:
                lines.append(f"  nonsense: {why}")
        return "\n".join(lines)


def _shell(arg: str) -> str:
    return arg if re.fullmatch(r"[\w@%+=:,./{}-]+", arg) else repr(arg)


def materialize(case: Case, folder: Path) -> None:
    for f in case.files:
        p = folder / f.name
        p.parent.mkdir(parents=True, exist_ok=True)
        if f.kind == "file":
            p.write_bytes(f.data)
        elif f.kind == "big":  # over the 16 MiB input cap: comment lines, so it is valid if read at all
            with open(p, "wb") as fh:
                fh.write(f.data)
                line = b"# padding" + b"." * 1013 + b"\n"
                fh.write(line * (17 * 1024))
        elif f.kind == "dir":
            p.mkdir(exist_ok=True)
        elif f.kind == "fifo":
            os.mkfifo(p)
        elif f.kind == "chardev":
            os.mknod(p, stat.S_IFCHR | 0o666, os.makedev(1, 3))
        elif f.kind == "loop":
            os.symlink(p.name, p)
        elif f.kind == "unreadable":
            p.write_bytes(f.data)
        else:
            raise ValueError(f.kind)
        if f.mode is not None:
            os.chmod(p, f.mode)


def _argv(run: tuple[str, ...], folder: Path) -> list[str]:
    return [a.replace("{D}", str(folder)) for a in run]


# ---------------------------------------------------------------------------------------------------
# Running one argv in this process: time limit, memory limit, captured output


class Hang(BaseException):
    """Raised by SIGALRM inside a run that took longer than HANG_S (BaseException: no `except Exception`
    in the planner swallows it)."""


class Flood(BaseException):
    """Raised when a run writes more than FLOOD_BYTES to stdout."""


class Launched(BaseException):
    """Raised where validate or calibrate would start torch processes or measure this machine."""


class _CappedSink(io.RawIOBase):
    def __init__(self, cap: int):
        self.buf = bytearray()
        self.cap = cap

    def writable(self):
        return True

    def write(self, b):
        if len(self.buf) + len(b) > self.cap:
            raise Flood(f"more than {self.cap:,} bytes written")
        self.buf += b
        return len(b)


def _stream(cap: int):
    raw = _CappedSink(cap)
    return raw, io.TextIOWrapper(io.BufferedWriter(raw), encoding="utf-8", write_through=True)


@dataclass
class RunResult:
    argv: list[str]
    rc: int | None
    out: str
    err: str
    exc: BaseException | None
    frame: str  # innermost planner frame of exc, "" if none
    warned: list[str]
    seconds: float


_IGNORED_WARNINGS = (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning)


def _vm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmSize:"):
                return int(line.split()[1]) * 1024
    return 0


def innermost_planner_frame(tb) -> str:
    planner_dir = str(ROOT / "planner") + os.sep
    found = ""
    for fr in traceback.extract_tb(tb):
        if fr.filename.startswith(planner_dir):
            found = f"{Path(fr.filename).relative_to(ROOT)}:{fr.name}:{fr.lineno}"
    return found


def _first_call(tb) -> str:
    """The first planner frame below the command line (planner/app/cli.py and the command modules under
    planner/app/commands/): what the command was doing."""
    planner_dir = str(ROOT / "planner") + os.sep
    command_line = (str(ROOT / "planner" / "app" / "cli.py"), str(ROOT / "planner" / "app" / "commands") + os.sep)
    frames = [fr for fr in traceback.extract_tb(tb) if fr.filename.startswith(planner_dir)]
    below = [fr for fr in frames if not fr.filename.startswith(command_line)]
    fr = (below or frames or [None])[0]
    return f"{Path(fr.filename).relative_to(ROOT)}:{fr.name}:{fr.lineno}" if fr else ""


@contextlib.contextmanager
def _no_launch():
    """validate and calibrate reach Launched instead of spawning ranks or measuring this machine."""
    import multiprocessing

    import torch.multiprocessing as tmp

    import planner.backends.torch.calibrate as cal
    import planner.backends.torch.calibrate_measure as calm
    import planner.backends.torch.launch as lau
    import planner.backends.torch.validate as val

    def refuse(*a, **k):
        raise Launched("a run would start here")

    saved = []
    targets = [(tmp, "start_processes"), (tmp, "spawn"), (multiprocessing.Process, "start"),
               (lau, "launch"), (val, "launch"), (cal, "measure_device"), (cal, "measure_collectives"),
               (calm, "measure_device"), (calm, "measure_collectives"), (calm, "spawned"), (cal, "spawned")]
    for obj, name in targets:
        if hasattr(obj, name):
            saved.append((obj, name, getattr(obj, name)))
            setattr(obj, name, refuse)
    try:
        yield
    finally:
        for obj, name, orig in reversed(saved):
            setattr(obj, name, orig)


def _on_alarm(signum, frame):
    raise Hang(f"over {HANG_S:g} s")


def run_argv(argv: list[str], cwd: Path, home: Path, hang_s: float = HANG_S) -> RunResult:
    """`planner argv` in this process, in cwd, with HOME and XDG folders under home, at most hang_s
    seconds and MEMORY_HEADROOM_BYTES more address space."""
    from planner.app.cli import main

    backend = bool(argv) and argv[0] in ("validate", "calibrate")
    if backend:  # imported outside the memory limit: torch maps a lot of address space
        import planner.backends.torch.calibrate
        import planner.backends.torch.validate  # noqa: F401
    out_raw, out = _stream(FLOOD_BYTES)
    err_raw, err = _stream(FLOOD_BYTES)
    env_keys = ("HOME", "XDG_DATA_HOME", "XDG_CONFIG_HOME", "XDG_CACHE_HOME", "XDG_STATE_HOME")
    env_saved = {k: os.environ.get(k) for k in env_keys}
    os.environ.update(HOME=str(home), XDG_DATA_HOME=str(home / "data"), XDG_CONFIG_HOME=str(home / "config"),
                      XDG_CACHE_HOME=str(home / "cache"), XDG_STATE_HOME=str(home / "state"))
    old_cwd = os.getcwd()
    os.chdir(cwd)
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    limit = _vm_bytes() + MEMORY_HEADROOM_BYTES
    old_handler = signal.signal(signal.SIGALRM, _on_alarm)
    rc, exc, frame = None, None, ""
    t0 = time.perf_counter()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with contextlib.ExitStack() as stack:
                if backend:
                    stack.enter_context(_no_launch())
                stack.enter_context(contextlib.redirect_stdout(out))
                stack.enter_context(contextlib.redirect_stderr(err))
                resource.setrlimit(resource.RLIMIT_AS, (limit if hard == resource.RLIM_INFINITY else
                                                        min(limit, hard), hard))
                signal.setitimer(signal.ITIMER_REAL, hang_s)
                try:
                    rc = main(argv)
                finally:
                    signal.setitimer(signal.ITIMER_REAL, 0)
                    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))
        except BaseException as e:
            if isinstance(e, KeyboardInterrupt):
                raise
            exc, frame = e, innermost_planner_frame(e.__traceback__)
        finally:
            signal.signal(signal.SIGALRM, old_handler)
            os.chdir(old_cwd)
            for k, v in env_saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v
    seconds = time.perf_counter() - t0
    for s in (out, err):
        with contextlib.suppress(BaseException):
            s.flush()
    warned = [f"{w.category.__name__}: {w.message}" for w in caught
              if not issubclass(w.category, _IGNORED_WARNINGS)]
    return RunResult(argv, rc, out_raw.buf.decode("utf-8", "replace"), err_raw.buf.decode("utf-8", "replace"),
                     exc, frame, warned, seconds)


# ---------------------------------------------------------------------------------------------------
# Judging


@dataclass
class Outcome:
    kind: str
    subcommand: str
    signature: str  # what dedups failures: class, subcommand, exception type and innermost planner frame
    detail: str
    case: Case
    argv: list[str] = field(default_factory=list)
    seconds: float = 0.0


def _subcommand(argv) -> str:
    if not argv:
        return "-"
    return " ".join(argv[:2]) if argv[0] == "profiles" and len(argv) > 1 else argv[0]


def _frame_key(frame: str) -> str:
    return frame.rsplit(":", 1)[0] if frame else "outside planner/"


def _reason_key(nonsense: str) -> str:
    """The first reason with its numbers and quoted values blanked: one key per kind of nonsense."""
    first = nonsense.split("; ")[0]
    first = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", first)
    first = re.sub(r"\.\.\.\(\d+ chars\)", "", first)
    return re.sub(r"-?\d[\d_.e+]*", "N", first)[:90]


def _bad_numbers(obj, path="") -> list[str]:
    """Fields of an estimate or plan as JSON that no real run can have."""
    bad = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            p = f"{path}.{k}" if path else k
            if k in ("mfu", "hfu") and isinstance(v, (int, float)) and not (0 <= v <= 1):
                bad.append(f"{p} = {v!r} (outside 0..1)")
            elif k in ("tokens_per_s", "step_time_s") and isinstance(v, (int, float)) and not (
                    math.isfinite(v) and v > 0):
                bad.append(f"{p} = {v!r} (not a positive finite number)")
            else:
                bad.extend(_bad_numbers(v, p))
    elif isinstance(obj, list):
        for i, v in enumerate(obj[:50]):
            bad.extend(_bad_numbers(v, f"{path}[{i}]"))
    return bad


def _impossible(argv: list[str], out: str) -> str:
    """Why an exit-0 output is impossible, or ""."""
    cmd = argv[0] if argv else ""
    if cmd not in ("estimate", "plan"):
        return ""
    if "--json" in argv:
        try:
            data = json.loads(out)
        except ValueError:
            return "--json output is not JSON"
        bad = _bad_numbers(data)
        if cmd == "plan":
            plans = data.get("plans") if isinstance(data, dict) else None
            for i, p in enumerate(plans or []):
                if isinstance(p, dict):
                    fits = p.get("fits", (p.get("estimate") or {}).get("fits"))
                    if fits is False:
                        bad.append(f"plans[{i}] does not fit, yet exit 0 (infeasible is exit 1)")
        return "; ".join(bad[:3])
    if cmd == "plan" and "DOES NOT FIT" in out:
        return "prints DOES NOT FIT with exit 0 (infeasible is exit 1)"
    for m in re.finditer(r"MFU\s+(-?[\d.]+|nan|inf)%", out):
        v = float(m.group(1))
        if not 0 <= v <= 100:
            return f"MFU {m.group(1)}%"
    if re.search(r"(?<![\d,.])0 tokens/s", out) or "nan tokens/s" in out:
        return "0 or nan tokens/s"
    return ""


def judge_run(case: Case, r: RunResult, nonsense: str, folder: Path) -> Outcome:
    sub = _subcommand(r.argv)

    def out(kind, key, detail):
        return Outcome(kind, sub, f"{kind} | {sub} | {key}", detail, case, r.argv, r.seconds)

    e = r.exc
    if isinstance(e, Hang):  # where the alarm struck is chance: keyed by the command's first planner call
        return out("hang", _frame_key(_first_call(e.__traceback__)), f"over {HANG_S:g} s, in {r.frame or '?'}")
    if isinstance(e, Flood):
        return out("flood", _frame_key(r.frame), f"more than {FLOOD_BYTES:,} bytes of output")
    if isinstance(e, Launched):
        if nonsense:
            return out("nonsense-accepted", _reason_key(nonsense), f"would launch on nonsense: {nonsense}")
        return out("ok", "", "would launch")
    if e is not None:
        return out("traceback", f"{type(e).__name__} @ {_frame_key(r.frame)}",
                   f"{type(e).__name__}: {str(e)[:300]} at {r.frame or '?'}")
    debris = sorted(p.name for p in folder.rglob(".*.tmp")) + sorted(p.name for p in folder.rglob("*.tmp"))
    if debris:
        return out("debris", "", f"temporary files left: {debris[:3]}")
    if r.rc == 0:
        if nonsense:
            return out("nonsense-accepted", _reason_key(nonsense), f"exit 0 on nonsense: {nonsense}")
        why = _impossible(r.argv, r.out)
        if not why and case.output:
            p = Path(case.output.replace("{D}", str(folder)))
            if not p.is_file():
                why = f"exit 0 but {p.name} was not written"
            elif case.output_mode is not None and stat.S_IMODE(p.stat().st_mode) != case.output_mode:
                why = (f"--force changed the mode of {p.name} from {case.output_mode:o} to "
                       f"{stat.S_IMODE(p.stat().st_mode):o}")
        if why:
            return out("impossible-output", why.split(" = ")[0].split("(")[0][:60], why)
        if r.warned:
            return out("warning", r.warned[0].split(":")[0], "; ".join(r.warned[:2])[:300])
        if "Traceback" in r.err:
            return out("traceback", "printed", r.err[-300:])
        return out("ok", "", "")
    lines = r.err.splitlines() + r.warned
    if r.rc in (1, 2) and "Traceback" not in r.err and len(lines) == 1 and lines[0].startswith("error: ") \
            and lines[0][7:].strip():
        return out("refused", "", lines[0][:200])
    return out("bad-refusal", f"rc {r.rc}", f"rc {r.rc}, stderr {r.err[-300:]!r}, warnings {r.warned[:2]}")


def run_case(case: Case, folder: Path, home: Path, hang_s: float = HANG_S) -> list[Outcome]:
    """Every run of the case, judged. folder: an empty folder of its own; home: HOME for the runs."""
    materialize(case, folder)
    outcomes = []
    nonsense = case.nonsense
    for i, run in enumerate(case.runs):
        r = run_argv(_argv(run, folder), folder, home, hang_s)
        extra = case.run_nonsense[i] if i < len(case.run_nonsense) else ""
        o = judge_run(case, r, nonsense or extra, folder)
        if case.oracle == "plan-file" and i == 0 and r.exc is None and r.rc == 2 and not nonsense:
            # Issue 16: a plan file is validated as estimate does before any command uses it.
            nonsense = "refused by estimate --plan: every command must refuse this plan file"
        if case.oracle == "backtest" and o.kind in ("ok", "refused"):
            o = _judge_backtest(case, r, o)
        outcomes.append(o)
    return outcomes


def _judge_backtest(case: Case, r: RunResult, o: Outcome) -> Outcome:
    def bad(kind, key, detail):
        return Outcome(kind, o.subcommand, f"{kind} | backtest | {key}", detail, case, r.argv, r.seconds)

    if r.rc != 0:
        if case.cells_only and any(g in baseline_predictions() for g in case.good_ids):
            return bad("rows-lost", "whole report refused",
                       f"bad cells refused the whole table: {r.err.strip()[:200]}")
        return o
    try:
        rows = {str(x["id"]): x for x in json.loads(r.out)["rows"]}
    except (ValueError, KeyError, TypeError):
        return bad("impossible-output", "backtest --json output", "backtest --json output is not the report")
    for k, rid in enumerate(case.bad_ids):
        x = rows.get(rid)
        if x is not None and x.get("status") == "ok":
            reason = case.bad_reasons[k] if k < len(case.bad_reasons) else "a nonsense cell"
            return bad("nonsense-accepted", "row predicted: " + _reason_key(reason),
                       f"row {rid} was predicted ({x.get('predicted')!r}) though {reason}")
    base = baseline_predictions()
    for rid in case.good_ids:
        x = rows.get(rid)
        want = base.get(rid)
        if want is None:
            continue
        got = x.get("predicted") if x and x.get("status") == "ok" else None
        if got is None or not math.isclose(got, want, rel_tol=1e-6):
            why = x.get("reason") if x else "missing from the report"
            return bad("rows-lost", "good row not predicted",
                       f"good row {rid}: predicted {got!r}, alone {want!r} ({str(why)[:150]})")
    return o


# ---------------------------------------------------------------------------------------------------
# Tallies


class Tally:
    def __init__(self):
        self.examples = 0
        self.counts: dict[tuple[str, str], int] = {}
        self.first: dict[str, Outcome] = {}
        self.seen: dict[str, int] = {}
        self.seconds = 0.0

    def add(self, outcomes: list[Outcome]) -> None:
        self.examples += 1
        for o in outcomes:
            self.counts[(o.subcommand, o.kind)] = self.counts.get((o.subcommand, o.kind), 0) + 1
            self.seconds += o.seconds
            if o.kind in FAILURES:
                self.seen[o.signature] = self.seen.get(o.signature, 0) + 1
                self.first.setdefault(o.signature, o)

    def merge(self, other: Tally) -> None:
        self.examples += other.examples
        self.seconds += other.seconds
        for k, v in other.counts.items():
            self.counts[k] = self.counts.get(k, 0) + v
        for k, v in other.seen.items():
            self.seen[k] = self.seen.get(k, 0) + v
            self.first.setdefault(k, other.first[k])

    @property
    def runs(self) -> int:
        return sum(self.counts.values())

    def by_class(self) -> dict[str, int]:
        out = {c: 0 for c in CLASSES}
        for (_, kind), n in self.counts.items():
            out[kind] += n
        return out

    @property
    def failures(self) -> int:
        return sum(self.by_class()[c] for c in FAILURES)

    def table(self) -> str:
        subs = sorted({s for s, _ in self.counts})
        cols = [c for c in CLASSES if any(self.counts.get((s, c)) for s in subs)] or ["ok"]
        width = max([len(s) for s in subs] + [10])
        lines = [f"{'subcommand':<{width}} " + " ".join(f"{c:>{max(len(c), 5)}}" for c in cols)]
        for s in subs:
            lines.append(f"{s:<{width}} " + " ".join(f"{self.counts.get((s, c), 0):>{max(len(c), 5)}}"
                                                     for c in cols))
        tot = self.by_class()
        lines.append(f"{'total':<{width}} " + " ".join(f"{tot[c]:>{max(len(c), 5)}}" for c in cols))
        lines.append(f"{self.examples} examples, {self.runs} runs, {self.failures} failing runs, "
                     f"{len(self.first)} distinct failures, {self.seconds:.1f} s in the planner")
        return "\n".join(lines)

    def report(self, limit: int = 40) -> str:
        parts = []
        for sig, o in sorted(self.first.items(), key=lambda kv: -self.seen[kv[0]])[:limit]:
            parts.append(f"[{self.seen[sig]}x] {sig}\n  {o.detail}\n" + _indent(o.case.describe(), "  "))
        return "\n".join(parts)


def _indent(text: str, pad: str) -> str:
    return "\n".join(pad + line for line in text.splitlines())


# ---------------------------------------------------------------------------------------------------
# Values: hostile literals in JSON and YAML spelling, with a class the nonsense rules read


@dataclass(frozen=True)
class Val:
    json: str
    yaml: str
    cls: str  # nan inf huge bigint neg zero frac bool boolstr numstr emptystr null list dict intfloat int str
    py: object = None


def _big(digits: int) -> str:
    return "1" + "7" * (digits - 1)


HOSTILE = (
    Val("NaN", ".nan", "nan"), Val("Infinity", ".inf", "inf"), Val("-Infinity", "-.inf", "inf"),
    Val("1e30", "1.0e+30", "huge"), Val("1e30", "1e30", "huge"), Val("1e309", "1.0e+309", "inf"),
    Val(str(2**63), str(2**63), "bigint"), Val(str(2**64 + 1), str(2**64 + 1), "bigint"),
    Val(_big(1000), _big(1000), "bigint"), Val(_big(5000), _big(5000), "bigint"),
    Val("-1", "-1", "neg"), Val("-4096", "-4096", "neg"), Val("0", "0", "zero"), Val("-0", "-0", "zero"),
    Val("0.5", "0.5", "frac"), Val("2.5", "2.5", "frac"), Val("1e-300", "1.0e-300", "frac"),
    Val("true", "true", "bool"), Val("false", "false", "bool"),
    Val('"yes"', "'yes'", "boolstr"), Val('"false"', "'false'", "boolstr"), Val('"no"', "'no'", "boolstr"),
    Val('"true"', "'true'", "boolstr"),
    Val('""', "''", "emptystr"), Val("null", "null", "null"), Val("[]", "[]", "list"), Val("{}", "{}", "dict"),
    Val("[1, 2]", "[1, 2]", "list"), Val('"4096"', "'4096'", "numstr"), Val("4096.0", "4096.0", "intfloat"),
    Val('"x\\ny"', "\"x\\ny\"", "str", "x\ny"),
)


def int_val(n: int) -> Val:
    return Val(str(n), str(n), "int", n)


def str_val(s: str) -> Val:
    return Val(json.dumps(s), json.dumps(s), "str", s)


def _literal(v: Val):
    """The value a JSON reader makes of the literal, or a marker for one it cannot read."""
    try:
        return json.loads(v.json)
    except ValueError:  # 5000 digits: past Python's int-from-text limit
        return _UNREADABLE


_UNREADABLE = object()


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_real(x) -> bool:
    return _is_int(x) or isinstance(x, float) and math.isfinite(x)


def value_nonsense(spec: str, v: Val) -> str:
    """Why v is nonsense in a field of this spec ("" when it may be valid). spec: pos, nonneg, bool,
    frac01 (a share 0..1), posfloat, ge1 (a number >= 1), enum:a|b|c; anything else is never judged.
    null, a number as a string ("4096") and an integral float (4096.0) are left unjudged: the issue does
    not call them nonsense."""
    if v.cls in ("null", "numstr", "intfloat"):
        return ""
    x = _literal(v)
    shown = v.json if len(v.json) <= 24 else v.json[:12] + f"...({len(v.json)} chars)"
    if spec in ("pos", "nonneg"):
        lo = 1 if spec == "pos" else 0
        if not _is_int(x) or not lo <= x < SURELY_NOT_A_SIZE:
            return f"{shown} where a {'positive' if lo else 'non-negative'} integer of sane size belongs"
        return ""
    if spec == "bool":
        if isinstance(x, bool) or (_is_int(x) and x in (0, 1)):
            return ""
        return f"{shown} where a boolean belongs"
    if spec == "frac01":
        return "" if _is_real(x) and 0 <= x <= 1 else f"{shown} where a share 0..1 belongs"
    if spec == "posfloat":
        return "" if _is_real(x) and x > 0 else f"{shown} where a positive number belongs"
    if spec == "ge1":
        return "" if _is_real(x) and x >= 1 else f"{shown} where a number >= 1 belongs"
    if spec.startswith("enum:"):
        allowed = spec[5:].split("|")
        if isinstance(x, str) and x in allowed or _is_int(x) and str(x) in allowed:
            return ""
        return f"{shown} is not one of {allowed}"
    return ""


@st.composite
def field_value(draw, spec: str) -> Val:
    """A hostile literal, or for number fields a plausible integer."""
    if spec in ("pos", "nonneg") and draw(st.booleans()):
        return int_val(draw(st.sampled_from([1, 2, 3, 4, 7, 8, 16, 64, 100, 1000, 4096, 65536, 10**6])))
    return draw(st.sampled_from(HOSTILE))


# Serialising a dict whose leaves may be Val: placeholders, dumped, then the literal text put back.


def _with_tokens(obj, vals: dict):
    if isinstance(obj, Val):
        tok = f"FUZZTOKEN{len(vals)}X"
        vals[tok] = obj
        return tok
    if isinstance(obj, dict):
        return {k: _with_tokens(v, vals) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_with_tokens(v, vals) for v in obj]
    return obj


def dump(obj, fmt: str) -> bytes:
    vals: dict[str, Val] = {}
    tokened = _with_tokens(obj, vals)
    if fmt == "json":
        text = json.dumps(tokened, indent=2)
        for tok, v in vals.items():
            text = text.replace(f'"{tok}"', v.json)
    else:
        text = yaml.safe_dump(tokened, sort_keys=False, width=10**9)
        for tok, v in vals.items():
            text = text.replace(tok, v.yaml)
    return text.encode()


def _get(d, path):
    for k in path.split("."):
        if isinstance(d, list):
            k = int(k)
            if k >= len(d):
                return None
        elif not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d


def _set(d, path, value):
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d.setdefault(k, {})
    if isinstance(d, list):
        d[int(keys[-1])] = value
    else:
        d[keys[-1]] = value


def _del(d, path):
    keys = path.split(".")
    for k in keys[:-1]:
        d = d[int(k)] if isinstance(d, list) else d[k]
    if isinstance(d, list):
        del d[int(keys[-1])]
    else:
        d.pop(keys[-1], None)


def _deep(fmt: str, depth: int = 100_000, kind: str = "list") -> bytes:
    if kind == "list":
        body = "[" * depth + "]" * depth
    else:
        body = '{"a": ' * depth + "1" + "}" * depth
    return (body if fmt == "json" else "a: " + body).encode()


STRUCTURAL = {  # whole-file replacements: every one is nonsense for a model, cluster or plan file
    "empty file": lambda fmt: b"",
    "only a comment": lambda fmt: b"# nothing here\n" if fmt != "json" else b"   \n",
    "null document": lambda fmt: b"null\n",
    "a list, not a mapping": lambda fmt: b"[1, 2, 3]\n",
    "a number, not a mapping": lambda fmt: b"42\n",
    "a string, not a mapping": lambda fmt: b'"layers"\n',
    "100k-deep nested lists": lambda fmt: _deep(fmt),
    "100k-deep nested mappings": lambda fmt: _deep(fmt, kind="dict") if fmt == "json" else
    ("a:\n" + "".join(" " * i + "a:\n" for i in range(1, 3000))).encode(),
    "not UTF-8": lambda fmt: b"layers: \xff\xfe\x00\x81\n",
    "binary bytes": lambda fmt: bytes(range(256)) * 4,
    "a 5000-digit integer document": lambda fmt: _big(5000).encode(),
}


@st.composite
def structural(draw, fmt: str, base_text: bytes):
    """(bytes, why): a whole-file replacement, or the base file cut short where that breaks it."""
    if draw(st.integers(0, 4)) == 0 and fmt == "json":
        cut = draw(st.integers(1, max(1, len(base_text) - 2)))
        text = base_text[:cut]
        try:
            json.loads(text)
            return text, ""
        except ValueError:
            return text, "JSON cut short"
    why = draw(st.sampled_from(sorted(STRUCTURAL)))
    return STRUCTURAL[why](fmt), why


# ---------------------------------------------------------------------------------------------------
# Model files: mutations of the catalog's project YAML and HF config.json files

_POS, _NN, _B = "pos", "nonneg", "bool"
PROJECT_FIELDS = {"layers": _POS, "hidden": _POS, "heads": _POS, "kv_heads": _POS, "head_dim": _POS,
                  "ffn_hidden": _POS, "vocab": _POS, "max_seq": _POS, "gated_mlp": _B, "tied_embeddings": _B,
                  "bias": _B, "qkv_bias": _B, "dropout": _B, "norm": "enum:rmsnorm|layernorm",
                  "position": "enum:rope|learned"}
PROJECT_MOE = {"moe.experts": _POS, "moe.topk": _POS, "moe.ffn_hidden": _POS, "moe.shared_experts": _NN,
               "moe.shared_ffn_hidden": _NN, "moe.dense_layers_first": _NN, "moe.every": _POS}
PROJECT_REQUIRED = ("name", "layers", "hidden", "heads", "ffn_hidden", "vocab")
HF_LLAMA = {"num_hidden_layers": _POS, "hidden_size": _POS, "num_attention_heads": _POS,
            "num_key_value_heads": _POS, "head_dim": _POS, "intermediate_size": _POS, "vocab_size": _POS,
            "max_position_embeddings": _POS, "tie_word_embeddings": _B, "attention_bias": _B}
HF_FIELDS = {
    "llama": HF_LLAMA, "mistral": HF_LLAMA, "qwen2": HF_LLAMA, "qwen3": HF_LLAMA, "gemma": HF_LLAMA,
    "gemma2": HF_LLAMA, "phi3": HF_LLAMA, "olmo2": HF_LLAMA,
    "mixtral": {**HF_LLAMA, "num_local_experts": _POS, "num_experts_per_tok": _POS},
    "qwen2_moe": {**HF_LLAMA, "num_experts": _POS, "num_experts_per_tok": _POS, "moe_intermediate_size": _POS,
                  "shared_expert_intermediate_size": _NN, "decoder_sparse_step": _POS},
    "deepseek_v3": {**HF_LLAMA, "kv_lora_rank": _POS, "qk_nope_head_dim": _POS, "qk_rope_head_dim": _POS,
                    "v_head_dim": _POS, "q_lora_rank": _NN, "n_routed_experts": _POS, "num_experts_per_tok": _POS,
                    "moe_intermediate_size": _POS, "n_shared_experts": _NN, "first_k_dense_replace": _NN,
                    "n_group": _NN, "topk_group": _NN, "moe_layer_freq": _POS},
    "gpt2": {"n_layer": _POS, "n_embd": _POS, "n_head": _POS, "vocab_size": _POS, "n_inner": _POS,
             "n_positions": _POS, "tie_word_embeddings": _B},
    "gpt_neox": {"num_hidden_layers": _POS, "hidden_size": _POS, "num_attention_heads": _POS,
                 "intermediate_size": _POS, "vocab_size": _POS, "max_position_embeddings": _POS,
                 "tie_word_embeddings": _B},
}
HF_FIELDS["qwen3_moe"] = HF_FIELDS["qwen2_moe"]
HF_FIELDS["deepseek_v2"] = HF_FIELDS["deepseek_v3"]
HF_LAYERS = {"gpt2": "n_layer"}
# (field, past-the-end offset): MoE blocks start after the last block, or come every more-than-all blocks
MOE_PAST_END = {"project": (("moe.dense_layers_first", 0), ("moe.every", 1)),
                "deepseek_v3": (("first_k_dense_replace", 0),), "qwen2_moe": (("decoder_sparse_step", 1),),
                "qwen3_moe": (("decoder_sparse_step", 1),)}
MODEL_BASES = ("tiny-llama-20m.yaml", "moe-tiny.yaml", "gpt3-175b.yaml", "hf/llama3-8b.json",
               "hf/mixtral-8x7b.json", "hf/qwen3-30b-a3b.json", "hf/qwen2-57b-a14b.json", "hf/deepseek-v3.json",
               "hf/gpt2.json", "hf/gpt-neox-20b.json", "hf/gemma-7b.json", "hf/phi3-mini.json", "hf/olmo2-7b.json")


@cache
def _model_base(rel: str) -> tuple[bytes, object]:
    text = (ROOT / "models" / rel).read_bytes()
    data = json.loads(text) if rel.endswith(".json") else yaml.safe_load(text)
    return text, data


def model_bases() -> list[str]:
    return [b for b in MODEL_BASES if (ROOT / "models" / b).is_file()]


def _model_fields(data: dict, rel: str) -> tuple[str, dict, str]:
    """(kind, field specs, layers field) of a base model file."""
    if rel.endswith(".json"):
        mt = data.get("model_type", "")
        return mt, HF_FIELDS.get(mt, HF_LLAMA), HF_LAYERS.get(mt, "num_hidden_layers")
    specs = dict(PROJECT_FIELDS)
    if "moe" in data:
        specs.update(PROJECT_MOE)
    return "project", specs, "layers"


@st.composite
def model_document(draw) -> tuple[bytes, str, str]:
    """(file bytes, format, nonsense) of a mutated catalog model file."""
    rel = draw(st.sampled_from(model_bases()))
    fmt = "json" if rel.endswith(".json") else "yaml"
    text, base = _model_base(rel)
    if draw(st.integers(0, 9)) == 0:
        data, why = draw(structural(fmt, text))
        return data, fmt, why
    data = json.loads(json.dumps(base))
    kind, specs, layers_key = _model_fields(data, rel)
    why: dict[str, str] = {}  # field -> why it is nonsense now (a later op on the field replaces it)
    ops = draw(st.lists(st.sampled_from(["value", "value", "value", "past-end", "delete", "extra", "name"]),
                        min_size=1, max_size=3))
    for op in sorted(ops, key=lambda o: o == "past-end"):  # past the end of the final layer count
        if op == "value":
            key = draw(st.sampled_from(sorted(specs)))
            v = draw(field_value(specs[key]))
            if key.startswith("moe.") and not isinstance(data.get("moe"), dict):
                continue
            _set(data, key, v)
            why[key] = value_nonsense(specs[key], v)
        elif op == "past-end" and kind in MOE_PAST_END:
            key, off = draw(st.sampled_from(MOE_PAST_END[kind]))
            layers = _get(data, layers_key)
            if isinstance(layers, int) and not isinstance(layers, bool) and \
                    (kind != "project" or isinstance(data.get("moe"), dict)):
                _set(data, key, layers + off + draw(st.integers(0, 3)))
                why[key] = f"MoE layers past the last of {layers} blocks"
        elif op == "delete":
            key = draw(st.sampled_from(sorted(specs) + ["name"]))
            if _get(data, key) is None:
                continue
            _del(data, key)
            # a config.json without a key takes the transformers default: not nonsense
            why[key] = "a required field is missing" if kind == "project" and key in PROJECT_REQUIRED else ""
        elif op == "extra":
            data[draw(st.sampled_from(["layerz", "hiden", "num_layers", "moe_experts"]))] = 4
            if kind == "project":
                why["(extra)"] = "an unknown field (a misspelling) in a project model file"
        elif op == "name":
            key = "name" if kind == "project" else "_name_or_path"
            data[key] = draw(st.sampled_from(["x\ny", 'a"""b', "$(touch pwned)", "é" * 300]))
            why[key] = ""
    reasons = [f"{k}: {w}" for k, w in why.items() if w]
    return dump(data, fmt), fmt, "; ".join(reasons)


@st.composite
def model_cases(draw) -> Case:
    data, fmt, nonsense = draw(model_document())
    if fmt == "json" and draw(st.booleans()):
        files, path = (FileSpec("mdl/config.json", data=data),), "{D}/mdl"
    else:
        name = f"m.{fmt}" if fmt == "json" or draw(st.booleans()) else "m.yml"
        files, path = (FileSpec(name, data=data),), f"{{D}}/{name}"
    which = draw(st.sampled_from(["show", "estimate", "estimate", "estimate", "plan"]))
    if which == "show":
        run = ("profiles", "show", path, "--json")
    elif which == "estimate":
        run = ("estimate", "--model", path, "--cluster", "dgx-h100", "--gbs", "8", "--seq", "512", "--mbs", "1",
               "--json")
    else:
        run = ("plan", "--model", path, "--cluster", "jetson-orin", "--gbs", "8", "--seq", "512", "--json")
    return Case("model file", (run,), files, nonsense)


# ---------------------------------------------------------------------------------------------------
# Cluster files

CLUSTER_SPECS = {"name": "str1", "source": "str3", "provenance": "enum:datasheet|derived|measured|assumed",
                 "groups.0.count": _POS, "groups.0.node": "node", "groups.0.island": "any", "fabric": "link",
                 "between_islands.ports_per_node": _POS, "between_islands.link": "link", "notes": "any"}


@cache
def _catalog_names() -> dict[str, list[str]]:
    from planner import catalog
    from planner.importers import model_names

    return {"nodes": sorted(catalog._hardware_catalog()["nodes"]), "links": catalog.names("links"),
            "devices": catalog.names("devices"), "clusters": catalog.cluster_names(), "models": model_names()}


@cache
def _devices_per_node(node: str) -> int:
    from planner import catalog

    return sum(d.count for d in catalog.node_type(node).devices)


@cache
def cluster_bases() -> list[dict]:
    listed = yaml.safe_load((ROOT / "hardware_profiles/clusters/heterogeneous.yaml").read_text())
    own = [{"name": "fuzz-dgx", "source": "fuzz test cluster", "groups": [{"node": "dgx-h100", "count": 2}]},
           {"name": "fuzz-jetson", "source": "fuzz test cluster", "groups": [{"node": "jetson-orin", "count": 2}],
            "fabric": "eth-10g"},
           {"name": "fuzz-preset", "source": "fuzz test cluster", "groups": [{"node": "jetson-orin"}]}]
    return [c for c in listed if isinstance(c, dict)] + own


def _misspell(draw, name: str) -> str:
    how = draw(st.sampled_from(["append", "drop", "upper", "inject", "space"]))
    if how == "append":
        return name + "x"
    if how == "drop":
        return name[:-1]
    if how == "upper":
        return name.upper() if name.upper() != name else name + "-X"
    if how == "space":
        return name + " "
    return name + draw(st.sampled_from(["\nrm -rf ~", '"""; import os; os.system("id")', "$(id)", "'", "/../x"]))


@st.composite
def cluster_document(draw) -> tuple[bytes, str, dict]:
    bases = cluster_bases()
    base = draw(st.sampled_from(bases))
    if draw(st.integers(0, 9)) == 0:
        data, why = draw(structural("yaml", dump(base, "yaml")))
        return data, why, base
    data = json.loads(json.dumps(base))
    why_at: dict[str, str] = {}  # field -> why it is nonsense now
    names = _catalog_names()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["value", "value", "name", "name", "delete", "extra", "islands", "empty-groups"]))
        gi = draw(st.integers(0, len(data.get("groups") or [None]) - 1)) if isinstance(data.get("groups"), list) \
            and data["groups"] else 0
        if op == "value":
            key = draw(st.sampled_from(["groups.0.count", "between_islands.ports_per_node", "groups.0.island",
                                        "name", "source", "provenance", "notes"]))
            key = key.replace("groups.0", f"groups.{gi}")
            if key.startswith("groups") and not (isinstance(data.get("groups"), list) and data["groups"]):
                continue
            if key.startswith("between") and not isinstance(data.get("between_islands"), dict):
                continue
            spec = CLUSTER_SPECS[key.replace(f"groups.{gi}", "groups.0")]
            v = draw(field_value(_POS if spec == _POS else "any"))
            node = _get(data, f"groups.{gi}.node")
            if key.endswith("count") and v.cls == "int" and isinstance(node, str) and node in names["nodes"] \
                    and draw(st.booleans()):
                # just past the cap (10^6 devices), or far past it; a valid cluster near the cap takes
                # seconds to resolve (125,000 one-device nodes: 18 s), too slow to draw here
                v = int_val(draw(st.sampled_from([MAX_DEVICES // _devices_per_node(node) + 1, 10**7, 2**31])))
            _set(data, key, v)
            why = value_nonsense(_POS, v) if spec == _POS else ""
            if spec in ("str1", "str3"):  # what YAML makes of the literal: 1e30 is a string there
                try:
                    x = yaml.safe_load(v.yaml)
                except ValueError:
                    x = None
                if not isinstance(x, str) or len(x) < int(spec[3]):
                    why = f"{v.yaml[:20]} where a {'name' if spec == 'str1' else 'source'} belongs"
            if spec.startswith("enum:"):
                why = value_nonsense(spec, v)
            if key.endswith("count") and v.cls == "int" and not why:
                node = _get(data, f"groups.{gi}.node")
                if isinstance(node, str) and node in names["nodes"] and \
                        v.py * _devices_per_node(node) > MAX_DEVICES:
                    why = f"{v.py} nodes of {node} is past 10^6 devices"
            why_at[key] = why
        elif op == "name":
            key = draw(st.sampled_from([f"groups.{gi}.node", "fabric", "between_islands.link"]))
            cur = _get(data, key)
            if not isinstance(cur, str):
                continue
            if draw(st.booleans()):
                section = "nodes" if key.endswith("node") else "links"
                new = draw(st.sampled_from(names[section]))
                _set(data, key, new)
                why_at[key] = ""
            else:
                wrong = draw(st.sampled_from(["misspelled", "a device name"])) if key.endswith("node") else "misspelled"
                new = draw(st.sampled_from(names["devices"])) if wrong == "a device name" else _misspell(draw, cur)
                if new in names["nodes"] or new in names["links"]:
                    continue
                _set(data, key, new)
                why_at[key] = f"{wrong} reference {new!r}"
        elif op == "delete":
            key = draw(st.sampled_from(["name", "source", "groups", "fabric", "between_islands"]))
            if key not in data:
                continue
            del data[key]
            for k in list(why_at):
                if k.startswith(key):
                    why_at[k] = ""
            if key in ("name", "source", "groups"):
                why_at[key] = "a required field is missing"
        elif op == "extra":
            data[draw(st.sampled_from(["fabrik", "nodes", "count"]))] = "x"
            why_at["(extra)"] = "an unknown field (a misspelling)"
        elif op == "islands" and isinstance(data.get("groups"), list) and data["groups"]:
            g = dict(data["groups"][0]) if isinstance(data["groups"][0], dict) else {}
            g["island"] = "elsewhere"
            data["groups"] = list(data["groups"]) + [g]
        elif op == "empty-groups":
            data["groups"] = []
            why_at = {k: w for k, w in why_at.items() if not k.startswith("groups.")}
            why_at["groups"] = "empty"
    groups = data.get("groups") if isinstance(data.get("groups"), list) else []
    islands = [g.get("island", "main") for g in groups if isinstance(g, dict)]
    if all(isinstance(x, str) for x in islands) and len(set(islands)) > 1 and "between_islands" not in data:
        why_at["islands"] = "groups on several islands with nothing between them"
    reasons = [f"{k}: {w}" for k, w in why_at.items() if w]
    return dump(data, "yaml"), "; ".join(reasons), data


@st.composite
def cluster_cases(draw) -> Case:
    text, nonsense, data = draw(cluster_document())
    name = draw(st.sampled_from(["c.yaml", "c.yml"]))
    path = f"{{D}}/{name}"
    cheap = False
    groups = data.get("groups") if isinstance(data, dict) else None
    if isinstance(groups, list) and groups and all(isinstance(g, dict) and g.get("node") == "jetson-orin"
                                                   and isinstance(g.get("count", 1), int) and g.get("count", 1) <= 8
                                                   for g in groups):
        cheap = True
    which = draw(st.sampled_from(["show", "estimate", "estimate"] + (["plan"] if cheap else [])))
    nodes = ()
    if isinstance(groups, list) and any(isinstance(g, dict) and "count" not in g for g in groups) and \
            draw(st.booleans()):
        nodes = ("--nodes", str(draw(st.sampled_from([1, 2, 4]))))
    if which == "show":
        run = ("profiles", "show", path, "--json")
    elif which == "estimate":
        run = ("estimate", "--model", "tiny-llama-20m", "--cluster", path, *nodes, "--gbs", "64", "--seq", "512",
               "--mbs", "1", "--json")
    else:
        run = ("plan", "--model", "tiny-llama-20m", "--cluster", path, *nodes, "--gbs", "64", "--seq", "512",
               "--json")
    return Case("cluster file", (run,), (FileSpec(name, data=text),), nonsense)


# ---------------------------------------------------------------------------------------------------
# Flags

INT_FLAGS = ("nodes", "tp", "pp", "dp", "cp", "ep", "vpp", "mbs", "gbs", "seq")
WEIRD_INT_TEXT = ("", " ", "1e12", "2.5", "nan", "inf", "-inf", "0x10", "abc", "8 GPUs", "--", "1,2")
HUGE_INTS = (10**6 + 1, 10**7, 10**9, 10**12, 10**13, 2**31, 2**63 - 1, 2**63, 2**64, 10**30, 10**100)


@st.composite
def int_text(draw, small=(1, 2, 4, 8), hostile: bool = False) -> str:
    """A number flag's text: a plausible value (sometimes spelled as Python's int() still reads it), or
    with hostile=True zero, negative, huge or not an integer at all."""
    if not hostile:
        if draw(st.integers(0, 9)) == 0:  # Python's int() takes these; argparse does too
            return draw(st.sampled_from([" 8", "+4", "1_024", "\uff18", "00008"]))
        return str(draw(st.sampled_from(small)))
    kind = draw(st.sampled_from(["nonpos", "huge", "huge", "weird"]))
    if kind == "nonpos":
        return str(draw(st.integers(-10, 0)))
    if kind == "huge":
        return str(draw(st.sampled_from(HUGE_INTS)))
    return draw(st.sampled_from(WEIRD_INT_TEXT))


def _make_hostile(draw, vals: dict[str, str]) -> None:
    """Turn none, one or two of the flags hostile (most examples: one)."""
    keys = sorted(vals)
    for _ in range(draw(st.sampled_from([0, 0, 0, 1, 1, 2]))):
        if keys:
            vals[draw(st.sampled_from(keys))] = draw(int_text(hostile=True))


def parse_int(text: str) -> int | None:
    try:
        return int(text)
    except ValueError:
        return None


def _flag_nonsense(vals: dict[str, str], devices_per_node: int, fixed_nodes: int | None) -> list[str]:
    """The issue's rules for number flags: positive integers, within the caps."""
    why = []
    ints = {}
    for k, text in vals.items():
        v = parse_int(text)
        if v is None:
            why.append(f"--{k} {text!r} is not an integer")
        elif v <= 0:
            why.append(f"--{k} {v} is not positive")
        elif v > MAX_DEVICES and k not in ("gbs", "seq", "top", "mbs"):
            why.append(f"--{k} {v} is past 10^6 devices")
        else:
            ints[k] = v
    nodes = ints.get("nodes", fixed_nodes or 1)
    if nodes * devices_per_node > MAX_DEVICES and "nodes" in ints:
        why.append(f"--nodes {nodes} is past 10^6 devices")
    if ints.get("seq", 0) > MAX_SEQ:
        why.append(f"--seq {ints['seq']} is past 2^24")
    if "gbs" in ints:
        devices = nodes * devices_per_node
        # the fewest micro-batches any plan can have: all devices in dp, the given or the largest mbs
        mbs = ints.get("mbs", 2**20)
        dp = ints.get("dp", devices)
        if ints["gbs"] >= SURELY_NOT_A_SIZE or ints["gbs"] / (dp * mbs) > MAX_MICROBATCHES:
            why.append(f"--gbs {ints['gbs']} means over 10^5 micro-batches per step")
    return why


@st.composite
def documents_text(draw) -> tuple[str, str]:
    good = draw(st.sampled_from(["256", "128:512", "4096"]))
    bad = draw(st.sampled_from(["0", "-5", "a:b", "512:128", "", "1:2:3", "nan", ":", "1e3"]))
    return (good, "") if draw(st.integers(0, 2)) else (bad, f"--documents {bad!r} is malformed")


@st.composite
def estimate_flag_cases(draw) -> Case:
    model = draw(st.sampled_from(["tiny-llama-20m", "moe-tiny", "llama3-8b", "gpt3-175b"]))
    cluster, dpn = draw(st.sampled_from([("dgx-h100", 8), ("jetson-orin", 1), ("dgx-a100-80gb", 8),
                                         ("tpu-v5e-pod", None)]))
    if dpn is None:
        dpn = _devices_per_node(cluster) if cluster in _catalog_names()["nodes"] else 1
    vals = {"gbs": draw(int_text((8, 16, 64))), "seq": draw(int_text((512, 1024, 4096))),
            "mbs": draw(int_text((1, 2)))}
    for k in ("nodes", "tp", "pp", "cp", "ep", "vpp", "dp"):
        if draw(st.integers(0, 3)) == 0:
            vals[k] = draw(int_text())
    _make_hostile(draw, vals)
    if draw(st.integers(0, 9)) == 0:  # a required flag left out
        vals.pop(draw(st.sampled_from(["gbs", "seq", "mbs"])))
        missing = True
    else:
        missing = False
    why = _flag_nonsense(vals, dpn, None)
    if missing:
        why.append("a required flag is missing")
    argv = ["estimate", "--model", model, "--cluster", cluster]
    for k, v in vals.items():
        argv += [f"--{k}", v]
    if draw(st.integers(0, 3)) == 0:
        f = draw(st.sampled_from(["0", "0.5", "1", "0.25", "0.75", "1.5", "-0.1", "nan", "inf", "1e3", "", "half"]))
        argv += ["--offload-activations", f]
        try:
            x = float(f)
            ok = 0 <= x <= 1
        except ValueError:
            ok = False
        if not ok:
            why.append(f"--offload-activations {f!r} is not a share 0..1")
    if draw(st.integers(0, 4)) == 0:
        t = draw(int_text((1, 2, 4), hostile=draw(st.integers(0, 3)) == 0))
        argv += ["--seq-chunks", t]
        v = parse_int(t)
        if v is None or v <= 0 or v > MAX_DEVICES:
            why.append(f"--seq-chunks {t!r} is not a sane positive integer")
    if draw(st.integers(0, 5)) == 0:
        t = draw(st.sampled_from(["-1", "0", "2", "x", "10**9"]))
        argv += ["--recompute", "full", "--recompute-num-layers", t]
        v = parse_int(t)
        if v is None or v < 0:
            why.append(f"--recompute-num-layers {t!r} is not a non-negative integer")
    if draw(st.integers(0, 5)) == 0:
        d, bad = draw(documents_text())
        argv += ["--documents", d]
        if bad:
            why.append(bad)
    if draw(st.booleans()):
        argv.append("--json")
    return Case("flags", (tuple(argv),), (), "; ".join(why))


@st.composite
def plan_flag_cases(draw) -> Case:
    model = draw(st.sampled_from(["tiny-llama-20m", "moe-tiny"]))
    cluster = draw(st.sampled_from(["jetson-orin", "jetson-orin", "jetson-orin", "phone-snapdragon-8gen3",
                                    "dgx-h100"]))
    dpn = _devices_per_node(cluster)
    vals = {"gbs": draw(int_text((8, 16, 64))), "seq": draw(int_text((512, 1024)))}
    if cluster == "dgx-h100":  # fix the layout so the search stays small
        vals.update(tp=draw(st.sampled_from(["1", "2", "8"])), pp=draw(st.sampled_from(["1", "2"])), cp="1")
    elif draw(st.booleans()):
        vals["nodes"] = draw(int_text((1, 2, 4)))
    for k in ("tp", "pp", "cp", "dp", "ep", "vpp", "mbs"):
        if k not in vals and draw(st.integers(0, 4)) == 0 and not cluster.startswith("phone"):
            vals[k] = draw(int_text())
    maxes = {}
    for k in ("max_tp", "max_pp", "max_cp", "top"):
        if draw(st.integers(0, 4)) == 0:
            maxes[k] = draw(int_text((1, 2, 4)))
    _make_hostile(draw, vals if draw(st.integers(0, 3)) else maxes)
    why = _flag_nonsense(vals, dpn, None)
    for k, t in maxes.items():
        v = parse_int(t)
        if v is None or v <= 0:
            why.append(f"--{k.replace('_', '-')} {t!r} is not a positive integer")
        elif k.startswith("max_"):
            fixed = parse_int(vals.get(k[4:], "")) if k[4:] in vals else None
            if fixed is not None and fixed > v:
                why.append(f"--{k[4:]} {fixed} is above --{k.replace('_', '-')} {v}")
    argv = ["plan", "--model", model, "--cluster", cluster]
    for k, v in {**vals, **maxes}.items():
        argv += [f"--{k.replace('_', '-')}", v]
    files, output = (), ""
    if draw(st.integers(0, 5)) == 0:
        t = draw(st.sampled_from(["1", "1,2", "2,4", "0", "1,,2", "x", "-1", "1,2.5", ""]))
        argv += ["--seq-chunks", t]
        try:
            ok = all(int(x) > 0 for x in t.split(","))
        except ValueError:
            ok = False
        if not ok:
            why.append(f"--seq-chunks {t!r} is not a list of positive integers")
    if draw(st.integers(0, 5)) == 0:
        argv.append("--offload-activations")
    if draw(st.integers(0, 5)) == 0:
        save = draw(st.sampled_from(["", "{D}/best.json"]))
        argv += ["--save", save]
        if save == "":
            why.append("--save '' names no file")
        else:
            output = save
    if draw(st.booleans()):
        argv.append("--json")
    return Case("flags", (tuple(argv),), files, "; ".join(why), output=output)


@st.composite
def sweep_flag_cases(draw) -> Case:
    why = []

    def lst(kind, good, bad_items):
        items = [draw(st.sampled_from(good)) for _ in range(draw(st.integers(1, 2)))]
        if draw(st.integers(0, 5)) == 0:
            b = draw(st.sampled_from(bad_items))
            items.insert(draw(st.integers(0, len(items))), b)
            why.append(f"--{kind} has {b!r}")
        return ",".join(items)

    bad_int = ["0", "-2", "", "x", "2.5", str(2**63), "1e9"]
    argv = ["sweep", "--model", lst("model", ["tiny-llama-20m", "moe-tiny"], ["nosuch-model", "tiny-llama-20m;id", "tiny_llama"]),
            "--cluster", lst("cluster", ["jetson-orin"], ["jetson-orn", ""]),
            "--seq", lst("seq", ["512", "1024"], bad_int + [str(MAX_SEQ + 1)]),
            "--gbs", lst("gbs", ["8", "16"], bad_int),
            "--no-refine"]
    if draw(st.booleans()):
        argv += ["--nodes", lst("nodes", ["1", "2"], bad_int + [str(MAX_DEVICES + 1)])]
    if draw(st.integers(0, 3)) == 0:
        argv += ["--dtype", lst("dtype", ["bf16", "fp16"], ["fp7", "BF16", ""])]
    return Case("flags", (tuple(argv),), (), "; ".join(why))


@st.composite
def profiles_cases(draw) -> Case:
    names = _catalog_names()
    pool = names["devices"] + names["links"] + names["clusters"] + names["models"]
    name = draw(st.sampled_from(pool))
    if draw(st.integers(0, 2)) == 0:
        name = _misspell(draw, name)
        why = "" if name in pool else f"{name!r} names no preset or file"
    else:
        why = ""
    argv = ("profiles", "show", name) + (("--json",) if draw(st.booleans()) else ())
    if draw(st.integers(0, 9)) == 0:
        argv, why = ("profiles", "list", "--json"), ""
    return Case("flags", (argv,), (), why)


def flag_cases():
    return st.one_of(estimate_flag_cases(), estimate_flag_cases(), estimate_flag_cases(), plan_flag_cases(),
                     plan_flag_cases(), sweep_flag_cases(), profiles_cases())


# ---------------------------------------------------------------------------------------------------
# Plan files: mutations of real `plan --save` files

PLAN_BASES = {  # name: (plan argv, layers of its model)
    "dense": (["plan", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "8", "--seq", "512",
               "--schedule", "1f1b", "--tp", "2", "--pp", "2"], 6),
    "moe": (["plan", "--model", "moe-tiny", "--cluster", "dgx-h100", "--gbs", "16", "--seq", "512", "--ep", "2",
             "--schedule", "1f1b", "--tp", "1", "--pp", "1"], 4),
    "interleaved": (["plan", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--gbs", "16", "--seq", "512",
                     "--pp", "2", "--vpp", "3", "--tp", "1"], 6),
    "8b": (["plan", "--model", "llama3-8b", "--cluster", "dgx-h100", "--nodes", "1", "--gbs", "32", "--seq",
            "8192", "--tp", "8", "--pp", "1"], 32),
}
PLAN_FIELDS = {
    "plan.dp": _POS, "plan.tp": _POS, "plan.pp": _POS, "plan.vpp": _POS, "plan.cp": _POS, "plan.ep": _POS,
    "plan.etp": _POS, "plan.mbs": _POS, "plan.num_microbatches": _POS, "plan.seq_chunks": _POS,
    "plan.recompute_num_layers": _NN, "plan.zero": "enum:0|1|2|3", "plan.offload.optimizer": "frac01",
    "plan.offload.activations": "frac01", "workload.global_batch": _POS, "workload.seq_len": _POS,
    "workload.moe_capacity_factor": "posfloat", "workload.moe_imbalance": "ge1", "nodes": _POS,
    "schema_version": "enum:1", "plan.sp": _B, "plan.flash_attention": _B, "plan.overlap_grad_reduce": _B,
    "plan.overlap_tp_comm": _B, "plan.attention_pool": _B, "plan.recompute": "enum:none|selective|full",
    "plan.schedule": "enum:gpipe|1f1b|interleaved-1f1b|zb-h1", "plan.cp_comm": "enum:ring|a2a",
    "plan.moe_dispatch": "enum:a2a|tp_slice|deepep", "workload.dtype": "enum:bf16|fp16|fp8|fp32",
    "workload.grad_dtype": "enum:fp32|bf16|fp16", "workload.optimizer": "enum:adamw|adam|sgd",
    "workload.documents.mean_tokens": _POS, "workload.documents.max_tokens": _POS,
}
DEGREES = ("dp", "tp", "pp", "vpp", "cp", "ep", "mbs", "num_microbatches", "etp", "seq_chunks")


@cache
def plan_bases() -> dict[str, dict]:
    """The real plan files: `plan --save` run once per process."""
    from planner.app.cli import main

    folder = Path(tempfile.mkdtemp(prefix="planner-fuzz-bases-"))
    out = {}
    for name, (argv, _) in PLAN_BASES.items():
        path = folder / f"{name}.json"
        with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()) as err:
            rc = main([*argv, "--save", str(path)])
        if rc != 0:
            raise RuntimeError(f"base plan {name}: {' '.join(argv)} exited {rc}: {err.getvalue().strip()}")
        out[name] = json.loads(path.read_text())
    return out


def _plan_file_nonsense(d: dict, layers: int) -> list[str]:
    """What the issue lists about whole plans: degrees that contradict the cluster, the model or the batch."""
    p, w = d.get("plan"), d.get("workload")
    if not isinstance(p, dict) or not isinstance(w, dict):
        return []

    def i(x, default=None):
        return x if isinstance(x, int) and not isinstance(x, bool) and x > 0 else default

    dp, tp, pp, cp, vpp = (i(p.get(k, 1)) for k in ("dp", "tp", "pp", "cp", "vpp"))
    mbs, gbs, nm = i(p.get("mbs", 1)), i(w.get("global_batch")), p.get("num_microbatches")
    nodes = d.get("nodes")
    why = []
    if d.get("cluster") == "dgx-h100" and None not in (dp, tp, pp, cp):
        n = nodes if isinstance(nodes, int) and not isinstance(nodes, bool) else 1
        if n > 0 and dp * tp * pp * cp != 8 * n:
            why.append(f"dp*tp*pp*cp = {dp * tp * pp * cp} on {8 * n} devices")
    if pp is not None and vpp is not None and pp * vpp > layers:
        why.append(f"pp*vpp = {pp * vpp} chunks for {layers} layers")
    if i(nm) is not None and None not in (dp, mbs, gbs) and nm * mbs * dp != gbs:
        why.append(f"num_microbatches {nm} x mbs {mbs} x dp {dp} is not the global batch {gbs}")
    seq = i(w.get("seq_len"))
    if seq is not None and seq > MAX_SEQ:
        why.append(f"seq_len {seq} past 2^24")
    if gbs is not None and None not in (dp, mbs) and gbs / (dp * mbs) > MAX_MICROBATCHES:
        why.append(f"global batch {gbs} means over 10^5 micro-batches")
    part = p.get("partition")
    if isinstance(part, list) and pp is not None and vpp is not None:
        ranges = [s.get("layers") if isinstance(s, dict) else None for s in part]
        flat = [x for r in ranges if isinstance(r, list) and len(r) == 2 for x in r]
        ok = (len(part) == pp * vpp and len(flat) == 2 * len(part) and all(isinstance(x, int) for x in flat)
              and flat[0] == 0 and flat[-1] == layers and all(flat[2 * k] < flat[2 * k + 1] for k in range(len(part)))
              and all(flat[2 * k + 1] == flat[2 * k + 2] for k in range(len(part) - 1)))
        if not ok:
            why.append(f"partition {ranges} does not cover blocks 0..{layers} in {pp * vpp} stages")
    return why


@st.composite
def plan_document(draw) -> tuple[bytes, str, str]:
    """(file bytes, nonsense, base name) of a mutated plan file."""
    bases = plan_bases()
    name = draw(st.sampled_from(sorted(bases)))
    layers = PLAN_BASES[name][1]
    base = bases[name]
    if draw(st.integers(0, 9)) == 0:
        data, why = draw(structural("json", json.dumps(base, indent=2).encode()))
        return data, why, name
    d = json.loads(json.dumps(base))
    why_at: dict[str, str] = {}  # field -> why it is nonsense now
    hostile: dict[str, bool] = {}  # field -> holds a value of the wrong kind (whole-plan rules skipped)
    names = _catalog_names()
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["value", "value", "degree", "degree", "name", "partition", "delete", "extra",
                                   "estimate", "capacity"]))
        if op in ("value", "degree", "partition", "capacity") and not (
                isinstance(d.get("plan"), dict) and isinstance(d.get("workload"), dict)):
            continue  # deleted by an earlier op
        if op == "value":
            key = draw(st.sampled_from(sorted(PLAN_FIELDS)))
            spec = PLAN_FIELDS[key]
            if key.startswith("workload.documents"):
                d["workload"]["documents"] = d["workload"].get("documents") or {"mean_tokens": 256}
            v = draw(field_value(spec))
            _set(d, key, v)
            why_at[key] = value_nonsense(spec, v)
            hostile[key] = v.cls != "int" or bool(why_at[key])
        elif op == "degree":
            k = draw(st.sampled_from(DEGREES + ("nodes",)))
            v = draw(st.sampled_from([1, 2, 3, 4, 8, 16, 64, 1000, 10**6]))
            key = "nodes" if k == "nodes" else f"plan.{k}"
            _set(d, key, v)
            why_at[key], hostile[key] = "", False
        elif op == "name":
            key = draw(st.sampled_from(["model", "cluster"]))
            if not isinstance(d.get(key), str):
                continue  # deleted by an earlier op
            if draw(st.booleans()):
                d[key] = draw(st.sampled_from(names["models"] if key == "model" else names["clusters"]))
                why_at[key], hostile[key] = "", True  # another model or cluster: the plan may not match it
            else:
                new = _misspell(draw, d[key])
                d[key] = new
                why_at[key], hostile[key] = f"{new!r} names nothing in the catalog", True
        elif op == "partition":
            p = d["plan"]
            stages = p.get("pp", 1) * p.get("vpp", 1) if isinstance(p.get("pp"), int) and isinstance(
                p.get("vpp", 1), int) else 1
            stages = max(1, min(stages, 64))
            cuts = sorted(draw(st.lists(st.integers(1, max(1, layers - 1)), min_size=stages - 1,
                                        max_size=stages - 1, unique=True))) if stages - 1 <= layers - 1 else []
            bounds = [0] + cuts + [layers]
            part = [{"layers": [bounds[k], bounds[k + 1]]} for k in range(len(bounds) - 1)]
            how = draw(st.sampled_from(["as is", "negative", "gap", "past the end", "one short", "reversed"]))
            if part:
                if how == "negative":
                    part[0]["layers"] = [-4, part[0]["layers"][1]]
                elif how == "gap" and len(part) > 1:
                    part[1]["layers"] = [part[1]["layers"][0] + 1, part[1]["layers"][1] + 1]
                elif how == "past the end":
                    part[-1]["layers"] = [part[-1]["layers"][0], layers + 5]
                elif how == "one short":
                    part = part[:-1]
                elif how == "reversed":
                    part[0]["layers"] = part[0]["layers"][::-1]
            p["partition"] = part
        elif op == "delete":
            key = draw(st.sampled_from(["model", "cluster", "workload", "plan", "workload.global_batch",
                                        "workload.seq_len", "estimate", "plan.tp"]))
            if _get(d, key) is None:
                continue
            _del(d, key)
            for k in list(why_at):
                if k.startswith(key):
                    why_at[k], hostile[k] = "", False
            if key not in ("estimate", "plan.tp"):
                why_at[key], hostile[key] = "a required field is missing", True
        elif op == "extra":
            where = draw(st.sampled_from(["", "plan.", "workload."]))
            _set(d, where + draw(st.sampled_from(["tpp", "pipeline", "gbs"])), 2)
            why_at["(extra)"] = "an unknown field (a misspelling)"
        elif op == "estimate" and isinstance(d.get("estimate"), dict):
            d["estimate"]["mfu"] = draw(st.sampled_from([1.57, -1.0, 0.0]))
            d["estimate"]["tokens_per_s"] = draw(st.sampled_from([1e30, 0.0]))
        elif op == "capacity":
            d["workload"]["moe_capacity_factor"] = draw(st.sampled_from([0.01, 0.1, 0.5, 1.0, 1.25]))
    reasons = [f"{k}: {w}" for k, w in why_at.items() if w]
    if not any(hostile.values()):
        reasons += _plan_file_nonsense(d, layers)
    return dump(d, "json"), "; ".join(reasons), name


@st.composite
def plan_file_cases(draw) -> Case:
    data, nonsense, base = draw(plan_document())
    f = "{D}/p.json"
    other = draw(st.sampled_from(["megatron", "deepspeed", "torchtitan", "torchtitan-py", "simulate", "simulate",
                                  "validate"]))
    if other == "simulate":
        second = ("simulate", f, "--json")
    elif other == "validate":
        second = ("validate", f)
        if base == "8b":
            return Case("plan file", (("estimate", "--plan", f, "--json"), second), (FileSpec("p.json", data=data),),
                        nonsense, oracle="plan-file",
                        run_nonsense=("", "validate: an 8B plan needs more memory per rank than this machine has"))
    else:
        second = ("export", f, "--to", other)
    return Case("plan file", (("estimate", "--plan", f, "--json"), second), (FileSpec("p.json", data=data),),
                nonsense, oracle="plan-file")


# ---------------------------------------------------------------------------------------------------
# Runs tables for backtest

RUNS_FILE = ROOT / "tests" / "data" / "calibration_runs_clean.csv"
RUN_POOL = ("169", "24", "2", "207", "26", "5", "72", "76")  # cheap rows of the table, dense, interleaved, MoE
# Columns a row cannot do without; tp, pp and gpus_per_node may be empty (unprinted: 1, 1, 8), as in rows
# of the reference table itself.
REQ_POS_INT = ("layers", "hidden", "heads", "ffn_hidden", "seq_len", "device_count", "global_batch")
OPT_POS_INT = ("tp", "pp", "gpus_per_node", "kv_heads", "head_dim", "vocab", "vpp", "dp", "cp", "ep", "etp",
               "micro_batch", "moe_topk", "moe_ffn_hidden")
OPT_NONNEG_INT = ("moe_experts", "moe_shared_experts", "dense_layers_first", "sp", "zero", "gated_mlp")
TARGET_COLUMN = {"step_time": "measured_step_time_s", "tokens_per_s": "measured_tokens_per_s_per_device",
                 "tflops": "measured_tflops_per_device", "mfu": "measured_mfu_pct", "hfu": "measured_hfu_pct"}
CELL_TEXT = ("abc", "yes", "8 GPUs", "1e3x", "#REF!", "x8")  # not pandas' NA spellings (n/a, NULL, ...)
CELL_VALUES = {"text": CELL_TEXT, "empty": ("",), "nan": ("nan", "NaN"), "inf": ("inf", "-inf", "Infinity"),
               "zero": ("0", "0.0"), "neg": ("-1", "-8", "-0.5"), "frac": ("2.5", "0.5", "7.9"),
               "huge": ("1e30", str(2**63), str(10**40)), "plausible": ("1", "2", "3", "4", "8", "16", "1000")}


@cache
def runs_table() -> tuple[list[str], dict[str, dict]]:
    with open(RUNS_FILE, newline="") as f:
        rows = list(csv.DictReader(f))
    return list(rows[0].keys()), {r["id"]: r for r in rows}


MOE_COLS = ("moe_topk", "moe_ffn_hidden", "moe_shared_experts", "dense_layers_first")


def cell_nonsense(col: str, cls: str, row: dict) -> str:
    """Why the cell makes the row nonsense: text, inf or negative in any numeric column; empty in a
    required one; zero where the count must be positive; fractional or absurd where an integer belongs
    (MoE columns of a dense row only for the first kind); the measured value text, inf or <= 0."""
    target_col = TARGET_COLUMN.get(row.get("target", ""))
    if col == target_col:
        if cls in ("text", "inf", "zero", "neg"):
            return f"measured {col} is {cls}"
        return ""
    numeric = col in REQ_POS_INT + OPT_POS_INT + OPT_NONNEG_INT
    if not numeric:
        return ""
    if cls in ("text", "inf", "neg"):
        return f"{col} is {cls}"
    if col in MOE_COLS and row.get("moe_experts", "").strip() in ("", "0", "0.0", "nan", "NaN"):
        return ""  # unused by a dense row
    if cls in ("empty", "nan") and col in REQ_POS_INT:
        return f"required {col} is empty"
    if cls == "zero" and col in REQ_POS_INT + OPT_POS_INT:
        return f"{col} is zero"
    if cls in ("frac", "huge"):
        return f"{col} is {cls}"
    return ""


@cache
def baseline_predictions() -> dict[str, float]:
    """What each pool row predicts in a table of only the unmutated pool rows (rows do not depend on each other)."""
    header, rows = runs_table()
    folder = Path(tempfile.mkdtemp(prefix="planner-fuzz-runs-"))
    path = folder / "pool.csv"
    _write_csv(path, header, [rows[i] for i in RUN_POOL])
    r = run_argv(["backtest", "--runs", str(path), "--json"], folder, folder, hang_s=300)
    if r.rc != 0 or r.exc is not None:
        raise RuntimeError(f"backtest of the unmutated pool failed: rc {r.rc}, {r.exc!r}, {r.err[-300:]}")
    return {str(x["id"]): x["predicted"] for x in json.loads(r.out)["rows"] if x["status"] == "ok"}


def _write_csv(path: Path, header: list[str], rows: list[dict]) -> None:
    path.write_bytes(_csv_bytes(header, rows))


def _csv_bytes(header: list[str], rows: list[dict]) -> bytes:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=header, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow(r)
    return buf.getvalue().encode()


@st.composite
def runs_cases(draw) -> Case:
    header, table = runs_table()
    numeric_cols = list(REQ_POS_INT + OPT_POS_INT + OPT_NONNEG_INT)
    good = draw(st.lists(st.sampled_from(RUN_POOL), min_size=0, max_size=3, unique=True))
    n_bad = draw(st.integers(1, 6))
    rows, bad_ids, bad_reasons, why = [dict(table[g]) for g in good], [], [], []
    for k in range(n_bad):
        src = dict(table[draw(st.sampled_from(RUN_POOL))])
        src["id"] = str(9000 + k)
        changed = {}
        for _ in range(draw(st.integers(1, 2))):
            col = draw(st.sampled_from(numeric_cols + [TARGET_COLUMN[src["target"]]]))
            cls = draw(st.sampled_from(sorted(CELL_VALUES)))
            src[col] = draw(st.sampled_from(CELL_VALUES[cls]))
            changed[col] = cls
        reasons = [(c, r) for c, r in ((c, cell_nonsense(c, k, src)) for c, k in changed.items()) if r]
        if reasons:
            bad_ids.append(src["id"])
            bad_reasons.append("; ".join(f"{c} = {src[c]!r} ({r})" for c, r in reasons))
            why.append(f"row {src['id']}: {reasons[0][1]}")
        rows.insert(draw(st.integers(0, len(rows))), src)
    structural_kind = draw(st.sampled_from(["none"] * 8 + ["drop-column", "header-only", "empty", "binary",
                                                           "ragged"]))
    cells_only = structural_kind == "none"
    if structural_kind == "none":
        data = _csv_bytes(header, rows)
    elif structural_kind == "drop-column":
        col = draw(st.sampled_from(["layers", "tp", "global_batch", "target", "device"]))
        h = [c for c in header if c != col]
        data = _csv_bytes(h, [{k: v for k, v in r.items() if k != col} for r in rows])
        why.append(f"required column {col} missing")
    elif structural_kind == "header-only":
        data = _csv_bytes(header, [])
    elif structural_kind == "empty":
        data, why = b"", ["empty file"]
    elif structural_kind == "binary":
        data, why = bytes(range(256)) * 8, ["binary file"]
    else:
        data = _csv_bytes(header, rows) + b"1,2,3\n" + b",".join([b"x"] * (len(header) + 5)) + b"\n"
    whole_nonsense = "; ".join(why) if structural_kind in ("empty", "binary", "drop-column") else ""
    return Case("runs table", (("backtest", "--runs", "{D}/runs.csv", "--json"),), (FileSpec("runs.csv", data=data),),
                whole_nonsense, oracle="backtest", bad_ids=tuple(bad_ids) if cells_only else (),
                bad_reasons=tuple(bad_reasons) if cells_only else (),
                good_ids=tuple(good) if cells_only else (), cells_only=cells_only)


# ---------------------------------------------------------------------------------------------------
# Paths: what the user names as an input or an output

LONG = "m" * 300 + ".yaml"
INPUT_PATHS = {  # kind: (FileSpec or None, path, nonsense unless the process can read anything)
    "missing": (None, "{D}/nope.yaml"),
    "directory": (FileSpec("d.yaml", "dir"), "{D}/d.yaml"),
    "FIFO": (FileSpec("f.yaml", "fifo"), "{D}/f.yaml"),
    "/dev/zero": (None, "/dev/zero"),
    "/dev/null": (None, "/dev/null"),
    "a character device": (FileSpec("nul.json", "chardev"), "{D}/nul.json"),
    "a 300-character name": (None, "{D}/" + LONG),
    "a symlink loop": (FileSpec("loop.yaml", "loop"), "{D}/loop.yaml"),
    "an empty name": (None, ""),
    "over 16 MiB": (FileSpec("big.yaml", "big"), "{D}/big.yaml"),
    "not UTF-8": (FileSpec("bin.json", data=b'{"a": "\xff\xfe"}'), "{D}/bin.json"),
    "/proc/self/mem": (None, "/proc/self/mem"),
    "no read permission": (FileSpec("secret.yaml", "unreadable", b"name: x\n", 0o000), "{D}/secret.yaml"),
}
INPUT_SLOTS = {
    "profiles show": lambda p: ("profiles", "show", p),
    "estimate --model": lambda p: ("estimate", "--model", p, "--cluster", "dgx-h100", "--gbs", "8", "--seq", "512",
                                   "--mbs", "1"),
    "estimate --cluster": lambda p: ("estimate", "--model", "tiny-llama-20m", "--cluster", p, "--gbs", "8", "--seq",
                                     "512", "--mbs", "1"),
    "estimate --plan": lambda p: ("estimate", "--plan", p),
    "plan --model": lambda p: ("plan", "--model", p, "--cluster", "jetson-orin", "--gbs", "8", "--seq", "512"),
    "simulate": lambda p: ("simulate", p, "--json"),
    "export": lambda p: ("export", p, "--to", "deepspeed"),
    "validate": lambda p: ("validate", p),
    "backtest": lambda p: ("backtest", "--runs", p),
    "sweep --model": lambda p: ("sweep", "--model", p, "--cluster", "jetson-orin", "--seq", "512", "--gbs", "8",
                                "--no-refine"),
}
OUTPUT_KINDS = ("unwritable folder", "missing folder", "a directory", "a FIFO", "a FIFO with --force",
                "a device with --force", "an existing file", "an existing file with --force", "an empty name",
                "a 300-character name", "a file as the folder", "new file")


def _output_slot(slot: str, out: str, force: bool) -> tuple[str, ...]:
    f = ("--force",) if force else ()
    if slot == "plan --save":
        return ("plan", "--model", "tiny-llama-20m", "--cluster", "jetson-orin", "--gbs", "8", "--seq", "512",
                "--save", out, *f)
    if slot == "export -o":
        return ("export", "{D}/base.json", "--to", "deepspeed", "-o", out, *f)
    if slot == "sweep -o":
        return ("sweep", "--model", "tiny-llama-20m", "--cluster", "jetson-orin", "--seq", "512", "--gbs", "8",
                "--no-refine", "-o", out, *f)
    if slot == "simulate -o":
        return ("simulate", "{D}/base.json", "-o", out, *f)
    raise ValueError(slot)


@st.composite
def path_cases(draw) -> Case:
    if draw(st.booleans()):
        kind = draw(st.sampled_from(sorted(INPUT_PATHS)))
        spec, path = INPUT_PATHS[kind]
        slot = draw(st.sampled_from(sorted(INPUT_SLOTS)))
        files = (spec,) if spec else ()
        nonsense = f"input {kind}"
        if kind == "no read permission" and os.geteuid() == 0:
            nonsense = ""  # root reads it anyway; what it holds is a bad model, plan or table, judged as any
        return Case("paths", (INPUT_SLOTS[slot](path),), files, nonsense)
    slot = draw(st.sampled_from(["plan --save", "export -o", "sweep -o", "simulate -o"]))
    kind = draw(st.sampled_from(OUTPUT_KINDS))
    ext = {"plan --save": ".json", "export -o": ".json", "sweep -o": ".csv", "simulate -o": ".svg"}[slot]
    files = [FileSpec("base.json", data=json.dumps(plan_bases()["moe"]).encode())]
    force, out, nonsense, output, mode = False, f"{{D}}/out{ext}", "", "", None
    if kind == "unwritable folder":
        out, nonsense = f"/proc/self/fuzz-out{ext}", "output in a folder nobody can write"
    elif kind == "missing folder":
        out = f"{{D}}/no/such/out{ext}"  # refusing or creating the folder are both fine
        output = out
    elif kind == "a directory":
        files.append(FileSpec(f"out{ext}", "dir"))
        nonsense, force = "output is a directory", draw(st.booleans())
    elif kind.startswith("a FIFO"):
        files.append(FileSpec(f"out{ext}", "fifo"))
        force = kind.endswith("--force")
        nonsense = "output is a FIFO" + (" (--force must not replace it)" if force else "")
    elif kind == "a device with --force":
        files.append(FileSpec(f"out{ext}", "chardev"))
        force, nonsense = True, "output is a device file (--force must not replace it)"
    elif kind == "an existing file":
        files.append(FileSpec(f"out{ext}", data=b"keep me\n"))
        nonsense = "output exists and no --force"
    elif kind == "an existing file with --force":
        files.append(FileSpec(f"out{ext}", data=b"old\n", mode=0o640))
        force, output, mode = True, out, 0o640
    elif kind == "an empty name":
        out, nonsense = "", "output named ''"
    elif kind == "a 300-character name":
        out, nonsense = "{D}/" + "o" * 300 + ext, "output name longer than the OS allows"
    elif kind == "a file as the folder":
        files.append(FileSpec("afile", data=b"x\n"))
        out, nonsense = f"{{D}}/afile/out{ext}", "output folder is a regular file"
    else:
        output = out
    return Case("paths", (_output_slot(slot, out, force),), tuple(files), nonsense, output=output,
                output_mode=mode)


# ---------------------------------------------------------------------------------------------------
# validate and calibrate: argument checking only (a run that gets past it hits Launched)


@st.composite
def backend_cases(draw) -> Case:
    base = {"base.json": json.dumps(plan_bases()["dense"]).encode(), "big.json": json.dumps(plan_bases()["8b"]).encode()}
    if draw(st.booleans()):
        plan = draw(st.sampled_from(["base.json", "big.json"]))
        files = (FileSpec(plan, data=base[plan]),)
        flags, why = [], []
        for _ in range(draw(st.integers(0 if plan == "big.json" else 1, 2))):
            flag = draw(st.sampled_from(["--backend", "--nproc", "--steps", "--warmup", "--threads", "--device",
                                         "--seed"]))
            if flag == "--backend":
                v = draw(st.sampled_from(["tensorflow", "", "TORCH", "torch "]))
            elif flag == "--device":
                v = draw(st.sampled_from(["tpu", "", "gpu"]))
            elif flag == "--seed":
                v = draw(st.sampled_from(["x", "1.5", ""]))
            elif flag == "--warmup":
                v = draw(st.sampled_from(["-1", "-100", "x"]))
            elif flag == "--nproc":
                v = draw(st.sampled_from(["0", "-1", "3", str(10**6), str(2**63), "x"]))
            else:
                v = draw(st.sampled_from(["0", "-1", "x", ""]))
            flags += [flag, v]
            why.append(f"validate {flag} {v!r}")
        if plan == "big.json" and "--force" not in flags:
            why.append("validate: the plan needs far more memory per rank than this machine has")
        return Case("backend", (("validate", f"{{D}}/{plan}", *flags),), files, "; ".join(why))
    flags, why, files = [], [], []
    kind = draw(st.sampled_from(["--backend", "--nproc", "--nproc", "--out-dir"]))
    if kind == "--backend":
        v = draw(st.sampled_from(["tensorflow", "", "TORCH", "jax"]))
        flags, why = ["--backend", v], [f"calibrate --backend {v!r}"]
    elif kind == "--nproc":
        v = draw(st.sampled_from(["0", "1", "-4", str(10**6), str(10**9), str(2**63), "x", "2.5"]))
        flags, why = ["--nproc", v], [f"calibrate --nproc {v!r}"]
    else:
        which = draw(st.sampled_from(["a regular file", "an empty name", "/dev/zero", "a FIFO"]))
        path = {"a regular file": "{D}/afile", "an empty name": "", "/dev/zero": "/dev/zero",
                "a FIFO": "{D}/fifo"}[which]
        if which == "a regular file":
            files.append(FileSpec("afile", data=b"x\n"))
        if which == "a FIFO":
            files.append(FileSpec("fifo", "fifo"))
        flags, why = ["--out-dir", path], [f"calibrate --out-dir is {which}"]
    if kind != "--out-dir":
        flags += draw(st.sampled_from([[], ["--quick"], ["--dry-run"], ["--quick", "--json"]]))
    else:
        flags += draw(st.sampled_from([[], ["--quick"], ["--force"]]))
    return Case("backend", (("calibrate", *flags),), tuple(files), "; ".join(why))


# ---------------------------------------------------------------------------------------------------
# The issue's own findings, each once (run before the generated examples)


def issue_cases() -> list[Case]:
    est = ("estimate", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--mbs", "1")
    cases = [
        Case("flags", (("estimate", "--model", "tiny-llama-20m", "--cluster", "dgx-h100", "--nodes", "1000000000",
                        "--gbs", "8", "--seq", "512", "--mbs", "1"),), (), "--nodes 10^9 is past 10^6 devices"),
        Case("flags", (("plan", "--model", "tiny-llama-20m", "--cluster", "jetson-orin", "--gbs", "10000000000000",
                        "--seq", "512"),), (), "--gbs 10^13 means over 10^5 micro-batches"),
        Case("flags", ((*est, "--gbs", "8", "--seq", "1000000000000"),), (), "--seq 10^12 is past 2^24"),
        Case("flags", ((*est, "--gbs", "8", "--seq", "9223372036854775808"),), (), "--seq 2^63 is past 2^24"),
        Case("flags", (("plan", "--model", "llama3-70b", "--cluster", "phones-snapdragon-wifi6", "--gbs", "8",
                        "--seq", "512"),), (), ""),
        Case("flags", (("plan", "--model", "tiny-llama-20m", "--cluster", "jetson-orin", "--nodes", "4", "--gbs",
                        "8", "--seq", "512", "--cp", "4", "--max-cp", "2"),), (), "--cp 4 is above --max-cp 2"),
        Case("flags", (("plan", "--model", "tiny-llama-20m", "--cluster", "jetson-orin", "--gbs", "8", "--seq",
                        "512", "--save", ""),), (), "--save '' names no file"),
        Case("paths", (("estimate", "--plan", "{D}/f.json"),), (FileSpec("f.json", "fifo"),), "input FIFO"),
        Case("paths", (("profiles", "show", "/dev/zero"),), (), "input /dev/zero"),
        Case("backend", (("calibrate", "--nproc", str(10**6), "--dry-run"),), (), "calibrate --nproc 10^6"),
    ]
    bases = plan_bases()
    for edit, why in ((lambda d: d["plan"].update(pp=1000), "pp 1000 on 6 layers"),
                      (lambda d: d["plan"].update(num_microbatches=7), "num_microbatches 7 x mbs 4 x dp 2 is not the batch 8"),
                      (lambda d: d.update(cluster="dgx-h10"), "misspelled cluster")):
        d = json.loads(json.dumps(bases["dense"]))
        edit(d)
        cases.append(Case("plan file", (("estimate", "--plan", "{D}/p.json", "--json"),
                                        ("export", "{D}/p.json", "--to", "megatron")),
                          (FileSpec("p.json", data=json.dumps(d).encode()),), why, oracle="plan-file"))
    d = json.loads(json.dumps(bases["moe"]))
    d["workload"]["moe_capacity_factor"] = 0.01
    cases.append(Case("plan file", (("estimate", "--plan", "{D}/p.json", "--json"),),
                      (FileSpec("p.json", data=json.dumps(d).encode()),), "", oracle="plan-file"))
    header, table = runs_table()
    bad = []
    for k in range(20):
        r = dict(table[RUN_POOL[k % len(RUN_POOL)]])
        r["id"] = str(9000 + k)
        r[REQ_POS_INT[k % len(REQ_POS_INT)]] = CELL_TEXT[k % len(CELL_TEXT)]
        bad.append(r)
    rows = bad[:10] + [dict(table["169"])] + bad[10:]
    cases.append(Case("runs table", (("backtest", "--runs", "{D}/runs.csv", "--json"),),
                      (FileSpec("runs.csv", data=_csv_bytes(header, rows)),), "", oracle="backtest",
                      bad_ids=tuple(r["id"] for r in bad), good_ids=("169",), cells_only=True))
    return cases


GROUPS = {  # name: (strategy factory, share of a run's examples)
    "flags": (flag_cases, 0.28),
    "model file": (model_cases, 0.2),
    "cluster file": (cluster_cases, 0.11),
    "plan file": (plan_file_cases, 0.18),
    "runs table": (runs_cases, 0.07),
    "paths": (path_cases, 0.11),
    "backend": (backend_cases, 0.05),
}
