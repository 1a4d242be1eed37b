"""pytest plugin of difftest (entry point ``pytest11``).

Gives a kernel developer one line to check a callable against the oracle::

    def test_my_align(difftest_check):
        difftest_check(my_lora_align, "vllm-lora", seconds=10)

and, with ``--difftest-impl NAME``, one extra test item per dialect of a
registered implementation (``torch``, ``cuda:<fault>``, ``py:mod:fn``...).
Heavy imports (torch, hypothesis, pandas) happen only when a check runs.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

_KEY = "difftest"


def pytest_addoption(parser):
    group = parser.getgroup("difftest", "differential testing of MoE align kernels")
    group.addoption("--difftest-impl", action="append", default=[], metavar="NAME",
                    help="also test this registered implementation (repeatable)")
    group.addoption("--difftest-seconds", type=float, default=None, metavar="S",
                    help="budget per check (default: the profile's, else 5)")
    group.addoption("--difftest-profile", choices=("ci", "dev", "nightly"), default=None,
                    help="budget profile: ci (bounded, deterministic), dev, nightly")
    group.addoption("--difftest-out", default=".difftest/pytest", metavar="DIR",
                    help="where run directories and bug reports go")


def _budget(config, seconds=None, max_examples=None, seed=0):
    profile_name = config.getoption("--difftest-profile")
    cli_seconds = config.getoption("--difftest-seconds")
    if profile_name:
        from difftest.profiles import PROFILES

        profile = PROFILES[profile_name]
        return (cli_seconds or seconds or profile.seconds,
                max_examples or profile.max_examples,
                seed if profile.seed is None else profile.seed, profile.shrink_seconds)
    return cli_seconds or seconds or 5.0, max_examples, seed, 20.0


def _out_dir(config, label):
    worker = os.environ.get("PYTEST_XDIST_WORKER", "main")
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in label)
    return os.path.join(config.getoption("--difftest-out"), worker, slug)


@pytest.fixture
def difftest_check(request):
    """``difftest_check(fn, dialect, seconds=None, max_examples=None, **kw)``.

    Runs a campaign against ``fn`` (a callable, or a name such as
    ``"op:ns::name"`` with ``load=[library paths]``) and fails the test with the
    minimal case and the path of its bug report; returns the
    :class:`difftest.api.CheckResult`. ``kw`` are :func:`difftest.api.check_callable`'s,
    e.g. ``limits={"num_experts": (1, 992)}`` for the callable's declared input domain.
    """

    def check(fn, dialect, *, seconds=None, max_examples=None, seed=0, **kwargs):
        from difftest.api import check_callable

        secs, examples, seed_, shrink = _budget(request.config, seconds, max_examples, seed)
        label = fn if isinstance(fn, str) else (
            f"py:{getattr(fn, '__module__', '?')}:{getattr(fn, '__qualname__', '?')}")
        kwargs.setdefault("out_dir", _out_dir(request.config, f"{request.node.name}-{label}"))
        kwargs.setdefault("shrink_seconds", shrink)
        result = check_callable(fn, dialect, seconds=secs, max_examples=examples, seed=seed_,
                                **kwargs)
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
        from difftest import registry
        from difftest.campaign import Campaign, FailureDatabase
        from difftest.cli import default_device
        from difftest.sandbox import SandboxRunner

        impl = registry.resolve(self.impl_name, self.dialect)
        device = "cuda" if "cpu" not in impl.devices else default_device()
        secs, examples, seed, shrink = _budget(self.config)
        out = _out_dir(self.config, f"{self.impl_name}-{self.dialect}")
        with SandboxRunner(impl, device) as runner:
            campaign = Campaign(impl, runner, out, seed=seed,
                                database=FailureDatabase(Path(".difftest/db")))
            campaign.replay_database()
            campaign.generate(dialects=(self.dialect,), contracts=("production", "defensive"),
                              max_examples=examples, seconds=secs)
            campaign.shrink_and_report(shrink_seconds=shrink)
            result = campaign.close()
        from difftest.api import check_result

        check = check_result(self.impl_name, self.dialect, result)
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


def pytest_configure(config):
    if config.getoption("--difftest-profile", default=None):
        from difftest.profiles import register_hypothesis_profiles

        register_hypothesis_profiles()


def pytest_runtest_logreport(report):
    if report.when != "call":
        return
    for key, value in getattr(report, "user_properties", ()):
        if key == _KEY:
            _ROWS.append((report.nodeid, report.outcome, value))


_ROWS: list = []


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    if not _ROWS:
        return
    tr = terminalreporter
    tr.section("difftest")
    for nodeid, outcome, row in _ROWS:
        tr.write_line(f"{outcome.upper():7s} {row['impl']} [{row['dialect']}] "
                      f"{row['cases']} cases  ({nodeid})")
        for sig, path in zip(row["failures"], row["reports"] or [""] * len(row["failures"])):
            tr.write_line(f"        {sig}: {path}")
