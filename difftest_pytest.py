"""pytest plugin of difftest (entry point ``pytest11``).

Gives a kernel developer one line to check a callable against the oracle::

    def test_my_align(difftest_check):
        difftest_check(my_lora_align, "vllm-lora", seconds=10)

and, with ``--difftest-impl NAME``, one extra test item per dialect of a
registered implementation (``torch``, ``cuda:<fault>``, ``py:mod:fn``...).
The callable runs in a sandbox worker: a crash or hang fails its test (with
the minimal case and the bug report's path) and the session goes on. That
needs the callable importable by name (defined at module level); pass
``in_process=True`` to run it in the test's own process instead (any
callable; no isolation). Heavy imports (torch, hypothesis, pandas) happen
only when a check runs. Per-run state lives in ``config.stash``.
"""

from __future__ import annotations

import os

import pytest

_KEY = "difftest"


def pytest_addoption(parser):
    group = parser.getgroup("difftest", "differential testing of MoE align kernels")
    group.addoption("--difftest-impl", action="append", default=[], metavar="NAME",
                    help="also test this registered implementation (repeatable)")
    group.addoption("--difftest-seconds", type=float, default=None, metavar="S",
                    help="budget of each check, shrinking and reports included (default: "
                    "the test's, else the profile's, else 5)")
    group.addoption("--difftest-profile", choices=("ci", "dev", "nightly"), default=None,
                    help="budget profile: ci (bounded, deterministic), dev, nightly")
    group.addoption("--difftest-out", default=".difftest/pytest", metavar="DIR",
                    help="where run directories and bug reports go")


def _out_dir(config, label):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    return os.path.join(config.getoption("--difftest-out"), worker, slug)


@pytest.fixture
def difftest_check(request):
    """``difftest_check(fn, dialect, seconds=None, max_examples=None, in_process=False, **kw)``.

    Runs a campaign against ``fn`` (a callable, or a name such as ``"op:ns::name"``
    with ``load=[library paths]``; in a sandbox worker unless ``in_process``) and
    fails the test with the minimal case and the path of its bug report; returns the
    :class:`difftest.api.CheckResult`. ``--difftest-seconds`` overrides ``seconds``.
    ``kw`` are :func:`difftest.api.check_callable`'s, e.g.
    ``limits={"num_experts": (1, 992)}`` for the callable's declared input domain.
    """

    def check(fn, dialect, *, seconds=None, max_examples=None, seed=0, in_process=False,
              **kwargs):
        from difftest.api import check_callable
        from difftest.errors import UsageError

        config = request.config
        label = fn if isinstance(fn, str) else (
            f"py:{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', '?')}")
        kwargs.setdefault("out_dir", _out_dir(config, f"{request.node.name}-{label}"))
        try:
            result = check_callable(
                fn, dialect, seconds=config.getoption("--difftest-seconds") or seconds,
                max_examples=max_examples, seed=seed,
                profile=config.getoption("--difftest-profile"), in_process=in_process,
                **kwargs)
        except UsageError as exc:
            pytest.fail(f"difftest_check: {exc}", pytrace=False)
        _remember(request.node, result)
        if not result.passed:
            pytest.fail(str(result), pytrace=False)
        return result

    return check


def _remember(node, result):
    node.user_properties.append((_KEY, {
        "impl": result.impl, "dialect": result.dialect, "cases": result.result.cases,
        "failures": sorted(result.result.failures),
        "reports": [str(p) for p in result.result.bug_dirs.values()],
    }))


class DifftestItem(pytest.Item):
    """One campaign of ``--difftest-impl NAME`` for one dialect."""

    def __init__(self, *, impl_name, dialect, **kwargs):
        super().__init__(**kwargs)
        self.impl_name, self.dialect = impl_name, dialect

    def runtest(self):
        from pathlib import Path

        from difftest import registry
        from difftest.api import DEFAULT_CHECK_SECONDS, check_result
        from difftest.budget import resolve_budget
        from difftest.campaign import FailureDatabase, run_campaign
        from difftest.cli import default_device
        from difftest.sandbox import SandboxRunner

        impl = registry.resolve(self.impl_name, self.dialect)
        device = "cuda" if "cpu" not in impl.devices else default_device()
        budget = resolve_budget(self.config.getoption("--difftest-profile"),
                                seconds=self.config.getoption("--difftest-seconds"), seed=0,
                                default_seconds=DEFAULT_CHECK_SECONDS)
        out = _out_dir(self.config, f"{self.impl_name}-{self.dialect}")
        with SandboxRunner(impl, device) as runner:
            campaign = run_campaign(impl, runner, Path(out), budget,
                                    database=FailureDatabase(Path(".difftest/db")))
        check = check_result(self.impl_name, self.dialect, campaign.result)
        _remember(self, check)
        if not check.passed:
            raise DifftestFailure(str(check))

    def repr_failure(self, excinfo):
        if isinstance(excinfo.value, DifftestFailure):
            return str(excinfo.value)
        return super().repr_failure(excinfo)

    def reportinfo(self):
        return self.path, None, f"difftest[{self.impl_name}:{self.dialect}]"


class DifftestFailure(Exception):
    pass


def pytest_collection_modifyitems(session, config, items):
    names = config.getoption("--difftest-impl")
    if not names:
        return
    from difftest import registry

    for name in names:
        try:
            impl = registry.resolve(name)
        except ValueError as exc:
            raise pytest.UsageError(str(exc)) from None
        for dialect in impl.dialects:
            items.append(DifftestItem.from_parent(
                session, name=f"difftest[{name}:{dialect}]", impl_name=name, dialect=dialect))


class _Section:
    """The ``difftest`` section of the terminal summary: one row per check of this run."""

    def __init__(self):
        self.rows = []

    def pytest_runtest_logreport(self, report):
        if report.when != "call":
            return
        for key, value in getattr(report, "user_properties", ()):
            if key == _KEY:
                self.rows.append((report.nodeid, report.outcome, value))

    def pytest_terminal_summary(self, terminalreporter):
        if not self.rows:
            return
        tr = terminalreporter
        tr.section("difftest")
        for nodeid, outcome, row in self.rows:
            tr.write_line(f"{outcome.upper():7s} {row['impl']} [{row['dialect']}] "
                          f"{row['cases']} cases  ({nodeid})")
            for sig, path in zip(row["failures"],
                                 row["reports"] or [""] * len(row["failures"])):
                tr.write_line(f"        {sig}: {path}")


_SECTION = pytest.StashKey[_Section]()


def pytest_configure(config):
    if config.getoption("--difftest-profile", default=None):
        from difftest.profiles import register_hypothesis_profiles

        register_hypothesis_profiles()
    config.stash[_SECTION] = section = _Section()
    config.pluginmanager.register(section, "difftest-section")


def pytest_unconfigure(config):
    section = config.stash.get(_SECTION, None)
    if section is not None:
        del config.stash[_SECTION]
        config.pluginmanager.unregister(section)
