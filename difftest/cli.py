"""``difftest`` — the command line (DESIGN.md; exit codes are binding).

Exit 0: no failure. Exit 1: failures found (the run directory says which).
Exit 2: usage or input error (a :class:`~difftest.errors.DifftestError` or an
oracle argument error) — one line on stderr, never a traceback. Exit 3: an
internal error of difftest — one line saying what broke, the seed and draw that
reproduce it and where the traceback was saved (``DIR/internal-error.txt``);
what was recorded before it is kept.
``difftest replay`` exits 125 when the implementation cannot be loaded or built
(``git bisect run`` skips such a commit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from .budget import DEFAULT_SHRINK_SECONDS, resolve_budget
from .errors import DifftestError, InternalError, LoadError, UsageError
from .profiles import PROFILES

EXIT_CLEAN, EXIT_FAILURES, EXIT_USAGE, EXIT_INTERNAL = 0, 1, 2, 3
# where an internal error's traceback goes when the command has no run directory
INTERNAL_ERROR_DIR = Path(".difftest") / "internal-errors"
EXIT_CANNOT_LOAD = 125  # replay only: git bisect's "skip this commit"
PROGRESS_FILE = "progress.json"  # a --workers child's latest state, in its part directory


class _OptionError(UsageError):
    """An option error; its message already starts with the (sub)command's name."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage)
        raise _OptionError(f"{self.prog}: {message} (see {self.prog} --help)")


def _positive(kind: type, noun: str):
    """An argparse type: ``kind(text)``, which must be finite and > 0."""
    def parse(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {noun}") from None
        if not math.isfinite(value):  # nan would never end a budget, inf is no budget
            raise argparse.ArgumentTypeError(f"{text!r}: must be a finite number > 0")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"{text!r}: must be > 0")
        return value

    return parse


_positive_float = _positive(float, "a number")
_positive_int = _positive(int, "an integer")


def _shard(text: str) -> tuple[int, int]:
    try:
        i, n = (int(x) for x in text.split("/"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected i/n, e.g. 0/4") from None
    if n < 1 or not 0 <= i < n:
        raise argparse.ArgumentTypeError(f"{text!r}: need 0 <= i < n")
    return i, n


def _edge_class_list(text: str) -> tuple[str, ...]:
    from .case import EDGE_CLASSES

    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in EDGE_CLASSES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(
            f"{', '.join(map(repr, unknown)) or repr(text)}: not an edge class; known: "
            f"{', '.join(EDGE_CLASSES)}")
    return names


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="difftest", description="Differential testing of MoE align kernels "
                "against an exact oracle.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def load_option(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--load", action="append", default=[], metavar="PATH",
                        help="op library to load first with torch.ops.load_library "
                        "(repeatable); its ops are --impl op:NAMESPACE::NAME")

    ls = sub.add_parser("list", help="implementations, dialects, faults, edge classes")
    load_option(ls)

    def common_impl(sp: argparse.ArgumentParser) -> None:
        sp.add_argument("--impl", required=True, help="torch, torch:<fault>, cuda, "
                        "cuda:<fault>, vllm, sglang, py:package.module:function, "
                        "op:NAMESPACE::NAME")
        load_option(sp)
        sp.add_argument("--dialect", help="align, vllm-lora, sglang-lora, ep-remap")
        sp.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda when available")
        sp.add_argument("--timeout", type=_positive_float, default=None,
                        help="seconds a case may take before it is a timeout (default 10, "
                        "confirmed by one re-run with 4x the budget; loading and building are "
                        "not counted)")
        sp.add_argument("--limit", action="append", metavar="NAME=MIN:MAX",
                        help="the implementation's input domain (repeatable; overrides its "
                        "difftest_limits; an empty side is open, e.g. num_experts=:992); names: "
                        "num_tokens, topk, num_experts, block_size, max_loras, "
                        "max_num_tokens_padded, num_routes, ep_size")

    run = sub.add_parser("run", help="run a campaign against the oracle")
    common_impl(run)
    run.add_argument("--contract", choices=("production", "defensive", "all"), default="all")
    run.add_argument("--max-examples", type=_positive_int,
                     help="at most this many cases, replayed ones included")
    run.add_argument("--seconds", type=_positive_float,
                     help="budget of the whole run: replay, generation (to 70%%), shrinking "
                     "and reports; it ends within 1.25x plus start-up (README: Budgets)")
    run.add_argument("--seed", type=int)
    run.add_argument("--out", type=Path)
    run.add_argument("--profile", choices=tuple(PROFILES),
                     help="budget preset: " + "; ".join(p.describe() for p in PROFILES.values()))
    run.add_argument("--shrink-seconds", type=_positive_float, default=None,
                     help="shrinking budget per failure signature, within --seconds "
                     f"(default: the profile's, else {DEFAULT_SHRINK_SECONDS:g})")
    run.add_argument("--no-shrink", action="store_true", help="report failures unshrunk")
    run.add_argument("--junit", type=Path, help="also write JUnit XML here")
    run.add_argument("--db", type=Path, default=Path(".difftest/db"),
                     help="failure database replayed first (default .difftest/db)")
    run.add_argument("--no-db", action="store_true", help="neither replay nor save failures")
    run.add_argument("--workers", type=_positive_int, default=1,
                     help="parallel worker processes (on CUDA spread round-robin over the "
                     "GPUs); their logs are merged into --out")
    run.add_argument("--gpus", help="'all' or a count: one worker per GPU")
    run.add_argument("--shard", type=_shard, help="i/n: this CI shard (seed derived from it)")
    run.add_argument("--in-process", action="store_true",
                     help="run the implementation in this process (no crash isolation)")
    run.add_argument("--quiet", action="store_true",
                     help="no progress (bar on a terminal, a line every 10 s elsewhere)")
    run.add_argument("--classes", type=_edge_class_list,
                     help="comma-separated edge classes: every case is built around one of "
                     "them (see `difftest list`)")
    run.add_argument("--json", action="store_true",
                     help="print the final summary as one JSON object, and nothing else, "
                     "on stdout")
    # a worker of --workers N: no summary of its own (the parent prints the merged one)
    run.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)

    rp = sub.add_parser("replay", help="re-run one saved case")
    rp.add_argument("case", type=Path)
    common_impl(rp)

    mn = sub.add_parser("minimize", help="shrink a failing case and write a bug report")
    mn.add_argument("case", type=Path)
    common_impl(mn)
    mn.add_argument("--out", type=Path)
    mn.add_argument("--shrink-seconds", type=_positive_float, default=60.0)

    rpt = sub.add_parser("report", help="rebuild the HTML summary of a run directory")
    rpt.add_argument("dir", type=Path)

    sc = sub.add_parser("selfcheck", help="run every shipped fault, show what was caught")
    sc.add_argument("--device", choices=("cpu", "cuda"))
    sc.add_argument("--seconds", type=_positive_float, default=30.0,
                    help="budget per fault, shrinking and its report included (default 30)")
    sc.add_argument("--seed", type=int, default=0)
    sc.add_argument("--out", type=Path)
    sc.add_argument("--faults", help="comma-separated subset of fault names")
    return p


def _cwd_importable() -> None:
    """Put the current directory on ``sys.path``, as ``python -m`` does (the ``difftest``
    console script does not), so ``--impl py:mykern:fn`` finds ``./mykern.py``. The
    sandbox worker is started with this process's ``sys.path``."""
    cwd = os.getcwd()
    if "" not in sys.path and cwd not in sys.path:
        sys.path.insert(0, cwd)


def main(argv: Sequence[str] | None = None) -> int:
    from oracle import OracleError

    _cwd_importable()
    ns = argparse.Namespace(command=None)
    try:
        ns = build_parser().parse_args(argv)
        ns._argv = list(argv) if argv is not None else sys.argv[1:]
        return _COMMANDS[ns.command](ns)
    except DifftestError as exc:
        _print_error(exc)
        return EXIT_USAGE
    except OracleError as exc:  # an input the oracle calls malformed (a replayed case)
        print(f"difftest: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("difftest: interrupted; what was recorded so far is kept", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - any other exception is a bug of ours
        error = InternalError.wrap(exc, f"difftest {ns.command or ''}".strip())
        return _internal(error, getattr(ns, "_run_dir", None))


def _internal(error: InternalError, run_dir: Path | None) -> int:
    """Save the traceback (in the run directory when there is one), print the line."""
    if error.saved_to is None:
        try:
            error.save(run_dir or INTERNAL_ERROR_DIR / time.strftime("%Y%m%d-%H%M%S"))
        except OSError:
            pass  # the line still says what broke
    print(f"difftest: {error.line()}", file=sys.stderr)
    return EXIT_INTERNAL


def _resolve(ns: argparse.Namespace, dialect: str | None) -> Any:
    """``--impl`` (``--dialect``, ``--load``) as an implementation, ``--limit`` put over
    its own declared limits."""
    from . import registry
    from .limits import parse_all

    return registry.resolve(ns.impl, dialect, load=ns.load).with_limits(parse_all(ns.limit))


# -- helpers -----------------------------------------------------------------
def _print_error(exc: DifftestError) -> None:
    text = str(exc).strip()
    # build errors carry a compiler log worth reading whole; anything else is one line
    text = text if "nvcc" in text else " ".join(text.split())
    # an option error's message already starts with the (sub)command's name
    print(text if isinstance(exc, _OptionError) else f"difftest: {text}", file=sys.stderr)


def default_device() -> str:
    if os.environ.get("DIFFTEST_DEVICE"):
        return os.environ["DIFFTEST_DEVICE"]
    return "cuda" if cuda_device_count() else "cpu"


def cuda_device_count() -> int:
    """The GPUs a worker of this run may use, without importing torch or initialising
    CUDA here (a campaign's own process needs neither; its workers load torch): the
    NVIDIA driver's device files ``/dev/nvidia0``, ``/dev/nvidia1``, ..., narrowed by
    ``CUDA_VISIBLE_DEVICES`` (whose list ends at its first empty or ``-1`` entry). A
    GPU there that the driver cannot use makes the worker's load fail, with its error."""
    import re

    try:
        names = os.listdir("/dev")
    except OSError:
        names = []
    present = sum(1 for name in names if re.fullmatch(r"nvidia\d+", name))
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return present
    listed = 0
    for entry in visible.split(","):
        if entry.strip() in ("", "-1"):
            break
        listed += 1
    return min(listed, present)


def _device_for(impl: Any, requested: str | None) -> str:
    device = requested or ("cuda" if "cpu" not in impl.devices else default_device())
    if device not in impl.devices:
        raise UsageError(f"--device={device}: {impl.name} runs on {', '.join(impl.devices)}")
    if device == "cuda" and default_device() != "cuda":
        raise UsageError(f"--device=cuda: no CUDA device is available on this machine "
                         f"(needed by {impl.name})")
    return device


def _runner(impl: Any, device: str, timeout: float | None, in_process: bool = False,
            cuda_device: int | None = None) -> Any:
    from .sandbox import DEFAULT_TIMEOUT_S, InProcessRunner, SandboxRunner

    if in_process:
        return InProcessRunner(impl, device)
    return SandboxRunner(impl, device, timeout_s=timeout or DEFAULT_TIMEOUT_S,
                         cuda_device=cuda_device)


def _load_case(path: Path) -> Any:
    from .case import Case
    from .errors import CaseError

    try:
        text = path.read_text()
    except OSError as exc:
        raise UsageError(f"CASE={path}: cannot read it ({exc.strerror})") from None
    try:
        return Case.from_json(text)
    except CaseError as exc:
        raise CaseError(f"CASE={path}: {exc}") from None


def _out_dir(requested: Path | None, label: str) -> Path:
    if requested is not None:
        return requested
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    return Path("difftest-out") / f"{time.strftime('%Y%m%d-%H%M%S')}-{slug}"


def _check_output(path: Path, option: str, *, is_dir: bool) -> None:
    """A usage error unless ``path`` can be written (a directory, or a file when not
    ``is_dir``), checked before the campaign so a bad path costs no run. Creates nothing:
    a probe file is made and removed in the nearest folder that exists."""
    import tempfile

    if path.exists():
        if is_dir and not path.is_dir():
            raise UsageError(f"{option}={path}: is a file, not a directory")
        if not is_dir and path.is_dir():
            raise UsageError(f"{option}={path}: is a directory, not a file")
        if not is_dir and not os.access(path, os.W_OK):
            raise UsageError(f"{option}={path}: the file is not writable")
    folder = path if is_dir else path.parent
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    if not folder.is_dir():
        raise UsageError(f"{option}={path}: {folder} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as exc:
        raise UsageError(f"{option}={path}: cannot write in {folder} "
                         f"({exc.strerror or type(exc).__name__})") from None


def _check_outputs(ns: argparse.Namespace, out: Path) -> None:
    """Every output path of a command, checked before anything runs (exit 2 if one is bad)."""
    _check_output(out, "--out", is_dir=True)
    if getattr(ns, "junit", None) is not None:
        _check_output(ns.junit, "--junit", is_dir=False)
    if getattr(ns, "db", None) is not None and not getattr(ns, "no_db", False):
        _check_output(ns.db, "--db", is_dir=True)


def shard_seed(seed: int | None, shard: tuple[int, int] | None) -> int | None:
    """The seed of CI shard ``i/n``: distinct per shard, reproducible from the base seed."""
    if shard is None:
        return seed
    base = 0 if seed is None else seed
    return (base * 1_000_003 + shard[0] * 7919 + shard[1]) % (2**31)


# -- commands ------------------------------------------------------------------
def cmd_list(ns: argparse.Namespace) -> int:
    from cuda_impl import FAULTS

    from . import adapters, registry
    from .case import CONTRACTS, DIALECTS, EDGE_CLASSES
    from .dialects import DIALECT_INFO

    print("implementations:")
    for name in registry.names():
        if name not in adapters.SOURCES:
            print(f"  {name}")
    for engine in adapters.SOURCES:
        print(f"  {engine:28s} {adapters.describe(engine)}")
    print("  py:package.module:function   (any callable in a dialect's calling convention)")
    print("  op:NAMESPACE::NAME           (an op of a library loaded with --load PATH)")
    print("dialects:")
    for d in DIALECTS:
        print(f"  {d:12s} {DIALECT_INFO[d].signature}")
    print("faults:")
    for f in FAULTS.values():
        print(f"  {f.name:24s} [{', '.join(f.backends)}; {', '.join(f.dialects)}] {f.summary}")
    print("contracts: " + ", ".join(CONTRACTS))
    print("edge classes: " + ", ".join(EDGE_CLASSES))
    for path in ns.load:
        _list_library(path)
    return EXIT_CLEAN


def _list_library(path: str) -> None:
    """The ops loading ``path`` registered, each with the dialect its schema matches."""
    from . import oplib, registry, signatures

    ops = oplib.registered_by(path)
    print(f"ops registered by {path}:" + ("" if ops else " none (or loaded before)"))
    for qualname in ops:
        op = oplib.find_op(qualname)
        try:
            dialect = registry.dialect_of(op, f"op:{qualname}")
            signatures.check_arguments(op, dialect, f"op:{qualname}")
            what = dialect
        except LoadError:
            what = f"no dialect: ({', '.join(signatures.positional_names(op))})"
        print(f"  op:{qualname:26s} {what}")


def _run_summary(out: Path, run: dict[str, Any], case_rows: Sequence[dict],
                 exit_code: int, junit: Path | None) -> dict[str, Any]:
    """The final summary of ``difftest run`` as one plain dict: what the console shows and
    what ``--json`` prints. ``run`` is ``run.json``'s content (merged for ``--workers``)."""
    import reports

    return {
        "exit_code": exit_code, "cases": run["cases"], "replayed": run["replayed"],
        "elapsed_s": round(run["elapsed_s"], 3), "seed": run["seed"],
        "verdicts": dict(sorted(run["verdicts"].items())), "failures": run["failures"],
        "contracts": reports.contract_split(case_rows), "run_dir": str(out),
        "junit": None if junit is None else str(junit),
        "domain": run.get("domain"), "limits": run.get("limits") or {},
        "signatures_over_cap": run.get("signatures_over_cap") or {},
    }


def _print_summary(summary: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(summary))
        return
    replayed = summary["replayed"]
    print(f"{summary['cases']} cases in {summary['elapsed_s']:.1f} s"
          + (f" ({replayed} replayed from the failure database)" if replayed else "")
          + ": " + ", ".join(f"{v} {n}" for v, n in summary["verdicts"].items()))
    if summary["limits"]:
        rejected = summary["verdicts"].get("rejected", 0)
        print(f"declared domain: {summary['domain']}"
              + (f" ({rejected} out-of-domain probe(s) rejected cleanly)" if rejected else ""))
    for f in summary["failures"]:
        print(f"FAIL {f['signature']}: {f['count']} case(s), first after {f['first_after']}"
              + (f"; report {f['report']}" if f["report"] else ""))
    capped = summary["signatures_over_cap"]
    if capped:
        from .campaign import MAX_SIGNATURES_PER_DIALECT

        print(f"FAIL {len(capped)} more signature(s) past the cap of "
              f"{MAX_SIGNATURES_PER_DIALECT} per dialect ({sum(capped.values())} case(s); "
              "not shrunk nor reported; listed in run.json)")
    for sentence in summary["contracts"]:
        print(sentence)
    print(f"run directory: {summary['run_dir']}  (summary.html, cases.parquet, "
          f"mismatches.parquet); seed {summary['seed']}")


def _seed_of_run(ns: argparse.Namespace, seed: int | None) -> int:
    """``seed``, or a fresh one (said on stderr with how to repeat it): every run is
    reproducible from its ``run.json``."""
    if seed is not None:
        return seed
    import random

    seed = random.randrange(2**31)
    if not ns.worker:
        print(f"difftest run: seed {seed} (drawn; --seed {seed} repeats these cases)",
              file=sys.stderr)
    return seed


def _check_classes(impl: Any, contracts: tuple[str, ...], classes: tuple[str, ...] | None
                   ) -> None:
    """A usage error now, not mid-campaign, when no case of this run can have ``classes``."""
    if classes is None:
        return
    from .strategies import cases

    try:
        cases(dialects=impl.dialects, contracts=contracts, classes=classes)
    except UsageError as exc:
        raise UsageError(f"--classes={','.join(classes)}: {str(exc).split(': ', 1)[1]}"
                         ) from None


def cmd_run(ns: argparse.Namespace) -> int:
    from dataclasses import replace

    from .campaign import FailureDatabase, Progress, run_campaign

    impl = _resolve(ns, ns.dialect)
    device = _device_for(impl, ns.device)
    contracts = ("production", "defensive") if ns.contract == "all" else (ns.contract,)
    budget = resolve_budget(ns.profile, seconds=ns.seconds, max_examples=ns.max_examples,
                            shrink_seconds=ns.shrink_seconds, seed=ns.seed)
    budget = replace(budget, seed=shard_seed(budget.seed, ns.shard))
    workers = _worker_count(ns, device)
    out = _out_dir(ns.out, ns.impl)
    _check_outputs(ns, out)
    _check_classes(impl, contracts, ns.classes)
    budget = replace(budget, seed=_seed_of_run(ns, budget.seed))
    ns._run_dir = out
    if workers > 1:
        return _run_parallel(ns, workers, out, budget.seed, device, budget)
    database = None if ns.no_db else FailureDatabase(ns.db)
    cuda_device = int(os.environ["DIFFTEST_GPU"]) if os.environ.get("DIFFTEST_GPU") else None
    with _runner(impl, device, ns.timeout, ns.in_process, cuda_device) as runner:
        campaign = run_campaign(impl, runner, out, budget, contracts=contracts,
                                database=database, progress=Progress(
                                    enabled=not ns.quiet,
                                    state_file=out / PROGRESS_FILE if ns.worker else None),
                                shrink=not ns.no_shrink, classes=ns.classes,
                                raise_internal=False)
    result = campaign.result
    internal = result.internal  # the cases recorded before it are kept
    code = EXIT_FAILURES if result.failed else EXIT_CLEAN
    if internal is not None:
        code = EXIT_INTERNAL
    # a gate is not green when nothing was checked (a --worker's parent counts them all)
    nothing = code == EXIT_CLEAN and not result.cases and not ns.worker
    if nothing:
        code = EXIT_USAGE
    failures = result.failure_records(impl.name)
    if ns.junit:
        import reports

        reports.write_junit(ns.junit, campaign.case_rows, failures)
    if not ns.worker:
        run = json.loads((out / "run.json").read_text())
        _print_summary(_run_summary(out, run, campaign.case_rows, code, ns.junit), ns.json)
    if nothing:
        _nothing_checked(budget, result.elapsed_s, out)
    if internal is not None:
        return _internal(internal, out)
    return code


def _nothing_checked(budget: Any, elapsed_s: float, out: Path) -> None:
    """The one line of a run in which no case ran (exit 2); its directory is written."""
    from .budget import nothing_checked

    limit = (f"--seconds {budget.seconds:g}" if budget.seconds is not None
             else f"--max-examples {budget.max_examples}")
    print(f"difftest run: {limit} checked nothing, so this run does not pass (exit 2): "
          f"{nothing_checked(elapsed_s)}; run directory {out}", file=sys.stderr)


def _worker_count(ns: argparse.Namespace, device: str) -> int:
    if ns.gpus is None:
        return ns.workers
    if device != "cuda":
        raise UsageError("--gpus: needs --device cuda")
    available = cuda_device_count()
    if ns.gpus == "all":
        return max(1, available)
    try:
        wanted = int(ns.gpus)
    except ValueError:
        raise UsageError(f"--gpus={ns.gpus!r}: must be 'all' or a positive count") from None
    if not 1 <= wanted <= available:
        raise UsageError(f"--gpus={wanted}: this machine has {available} GPU(s)")
    return wanted


def _run_parallel(ns: argparse.Namespace, workers: int, out: Path, seed: int | None,
                  device: str, budget: Any) -> int:
    """One child ``difftest run`` per worker (per GPU), seeds derived, logs merged; the
    children's progress shown as one (each keeps its state in ``PROGRESS_FILE``)."""
    import reports

    from .campaign import Progress

    out.mkdir(parents=True, exist_ok=True)
    gpus = max(1, cuda_device_count()) if device == "cuda" else 1
    base = _strip_options(ns._argv, {"--workers", "--gpus", "--out", "--seed", "--junit",
                                     "--shard"}, flags=frozenset({"--json"}))
    procs, parts = [], []
    for i in range(workers):
        part = out / "parts" / f"worker-{i}"
        parts.append(part)
        env = dict(os.environ)
        if device == "cuda":  # workers share the GPUs round-robin
            env["DIFFTEST_GPU"] = str(i % gpus)
        child_seed = shard_seed(seed, (i, workers))
        cmd = [sys.executable, "-m", "difftest"] + base + [
            "--out", str(part), "--seed", str(child_seed), "--quiet", "--worker"]
        procs.append(subprocess.Popen(cmd, env=env))
    progress = Progress(enabled=not ns.quiet)
    states = [part / PROGRESS_FILE for part in parts]
    while any(p.poll() is None for p in procs):
        time.sleep(0.2)
        progress.show_parts(states)
    progress.show_parts(states, force=True)
    progress.done()
    codes = [p.wait() for p in procs]
    if any(c == EXIT_USAGE for c in codes):
        raise UsageError(f"a worker stopped on a usage error (exit codes {codes})")
    reports.merge_runs(out, [part for part in parts if part.is_dir()])
    run = _merged_run_json(out, parts, seed, codes)
    reports.write_summary(out)  # after run.json: it shows the domain and capped signatures
    case_rows = reports.read_rows(out)[0]
    if ns.junit:
        reports.write_junit(ns.junit, case_rows, run["failures"])
    code = EXIT_FAILURES if any(c == EXIT_FAILURES for c in codes) else EXIT_CLEAN
    broken = [i for i, c in enumerate(codes) if c not in (EXIT_CLEAN, EXIT_FAILURES)]
    if broken:
        code = EXIT_INTERNAL
        print(f"difftest run: worker exit codes {codes}", file=sys.stderr)
    nothing = code == EXIT_CLEAN and not run["cases"]
    if nothing:
        code = EXIT_USAGE
    _print_summary(_run_summary(out, run, case_rows, code, ns.junit), ns.json)
    if nothing:
        _nothing_checked(budget, run["elapsed_s"], out)
    if broken:  # a worker's internal error, or one that died: the others' cases are kept
        i = broken[0]
        saved = parts[i] / "internal-error.txt"
        what = (saved.read_text().splitlines()[0] if saved.is_file()
                else f"exit code {codes[i]} (no traceback saved)")
        error = InternalError(f"worker {i} of {workers} stopped: {what}",
                              seed=shard_seed(seed, (i, workers)))
        error.saved_to = str(saved) if saved.is_file() else None
        return _internal(error, out)
    return code


def _merged_run_json(out: Path, parts: list[Path], seed: int,
                     codes: list[int] | None = None) -> dict[str, Any]:
    """The parts' ``run.json`` summed into ``out/run.json``: one record per failure
    signature, its report the merged copy under ``out/bugs``."""
    runs = [json.loads((p / "run.json").read_text()) for p in parts if (p / "run.json").exists()]
    verdicts: dict[str, int] = {}
    failures: dict[str, dict[str, Any]] = {}
    capped: dict[str, int] = {}
    for run in runs:
        for verdict, n in run["verdicts"].items():
            verdicts[verdict] = verdicts.get(verdict, 0) + n
        for sig, n in run.get("signatures_over_cap", {}).items():
            capped[sig] = capped.get(sig, 0) + n
        for f in run.get("failures", []):
            if f["signature"] in failures:
                seen = failures[f["signature"]]
                seen["count"] += f["count"]
                seen["first_after"] = min(seen["first_after"], f["first_after"])
                continue
            merged = out / "bugs" / f["signature"]
            failures[f["signature"]] = {**f, "report": str(merged) if merged.is_dir() else None}
    run = {"impl": runs[0]["impl"] if runs else None, "seed": seed,
           "cases": sum(r["cases"] for r in runs), "verdicts": verdicts,
           "replayed": sum(r["replayed"] for r in runs), "signatures": sorted(failures),
           "elapsed_s": max((r["elapsed_s"] for r in runs), default=0.0),
           "failures": [failures[s] for s in sorted(failures)],
           "parts": [str(p) for p in parts], "exit_codes": codes,
           "limits": runs[0].get("limits") if runs else None,
           "domain": runs[0].get("domain") if runs else None,
           "signatures_over_cap": capped}
    (out / "run.json").write_text(json.dumps(run, indent=1))
    return run


def _strip_options(argv: list[str], names: set[str], flags: frozenset[str] = frozenset()
                   ) -> list[str]:
    """``argv`` without the options ``names`` (each with its value) and ``flags`` (none)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in flags:
            continue
        if key in names:
            skip = "=" not in a
            continue
        out.append(a)
    return out


def cmd_replay(ns: argparse.Namespace) -> int:
    """Exit 0 when the case passes, 1 when it fails, 125 when the implementation cannot
    be loaded or built: ``git bisect run difftest replay case.json --impl …`` then
    marks good, bad and skipped commits."""
    from .evaluate import evaluate

    case = _load_case(ns.case)
    try:
        impl = _resolve(ns, ns.dialect or case.dialect)
        device = _device_for(impl, ns.device)
        with _runner(impl, device, ns.timeout) as runner:
            evaluation = evaluate(case, runner.run(case), stable=impl.stable,
                                  limits=impl.limits)
    except LoadError as exc:
        _print_error(exc)
        return EXIT_CANNOT_LOAD
    print(f"case {case.case_id} ({case.dialect}, {case.contract}; "
          f"{', '.join(case.edge_classes) or 'no edge class'}) on {impl.name}/{device}: "
          f"{evaluation.verdict}" + (f" ({evaluation.detail})" if evaluation.verdict == "rejected"
                                     else ""))
    for m in evaluation.mismatches[:10]:
        print(f"[{m.check}] {m.message}")
    return EXIT_FAILURES if evaluation.failed else EXIT_CLEAN


def cmd_minimize(ns: argparse.Namespace) -> int:
    from .budget import Budget
    from .campaign import Campaign

    case = _load_case(ns.case)
    impl = _resolve(ns, ns.dialect or case.dialect)
    device = _device_for(impl, ns.device)
    out = _out_dir(ns.out, f"minimize-{ns.impl}")
    _check_outputs(ns, out)
    ns._run_dir = out
    with _runner(impl, device, ns.timeout) as runner:
        campaign = Campaign(impl, runner, out, seed=None,
                            budget=Budget(shrink_seconds=ns.shrink_seconds))
        evaluation = campaign.run_one(case)
        if not evaluation.failed:
            campaign.close()
            how = ("passes" if evaluation.verdict == "pass"
                   else "is rejected cleanly (outside the declared limits)")
            print(f"case {case.case_id} {how} on {impl.name}: nothing to minimise")
            return EXIT_CLEAN
        campaign.shrink_and_report()
        result = campaign.close()
    for sig, path in result.bug_dirs.items():
        print(f"{sig}: minimal case and report in {path}")
    return EXIT_FAILURES


def cmd_report(ns: argparse.Namespace) -> int:
    import reports

    if not ns.dir.is_dir():
        raise UsageError(f"DIR={ns.dir}: not a directory")
    if not any((ns.dir / f).exists() for f in ("cases.jsonl", "cases.parquet")):
        raise UsageError(f"DIR={ns.dir}: not a run directory (no cases.jsonl or cases.parquet)")
    if (ns.dir / "cases.jsonl").exists():
        reports.rebuild_parquet(ns.dir)
    path = reports.write_summary(ns.dir)
    print(f"summary: {path}")
    return EXIT_CLEAN


def cmd_selfcheck(ns: argparse.Namespace) -> int:
    from .selfcheck import selfcheck

    device = ns.device or default_device()
    if device == "cuda" and default_device() != "cuda":
        raise UsageError("--device=cuda: no CUDA device is available on this machine")
    faults = ns.faults.split(",") if ns.faults else None
    out = _out_dir(ns.out, f"selfcheck-{device}")
    _check_outputs(ns, out)
    ok = selfcheck(device=device, seconds=ns.seconds, seed=ns.seed, out=out, faults=faults)
    return EXIT_CLEAN if ok else EXIT_FAILURES


_COMMANDS = {
    "list": cmd_list,
    "run": cmd_run,
    "replay": cmd_replay,
    "minimize": cmd_minimize,
    "report": cmd_report,
    "selfcheck": cmd_selfcheck,
}
