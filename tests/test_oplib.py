"""``--impl op:NAMESPACE::NAME --load LIB.so``: a compiled op library tested directly.

The library (tests/oplib/align_ops.cpp) is built here with g++ against the
installed torch, once per test session; without a compiler these tests skip.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")

from difftest.cli import main  # noqa: E402

TESTS = Path(__file__).resolve().parent
SOURCE = TESTS / "oplib" / "align_ops.cpp"
ALIGN_ARGS = ("topk_ids, num_experts, block_size, sorted_token_ids, expert_ids, "
              "num_tokens_post_pad, expert_map")


@pytest.fixture(scope="session")
def oplib(tmp_path_factory) -> str:
    """Path of the built library (cached for the session)."""
    from torch.utils import cpp_extension

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler to build the test op library")
    out = tmp_path_factory.mktemp("oplib") / "libdifftest_oplib.so"
    abi = int(torch._C._GLIBCXX_USE_CXX11_ABI)
    cmd = [compiler, "-shared", "-fPIC", "-O1", "-std=c++20", f"-D_GLIBCXX_USE_CXX11_ABI={abi}",
           *[f"-I{p}" for p in cpp_extension.include_paths()], str(SOURCE),
           *[f"-L{p}" for p in cpp_extension.library_paths()], "-lc10", "-ltorch_cpu",
           "-o", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    return str(out)


def _env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), str(TESTS.parent)])}


def _difftest(*args, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "difftest", *map(str, args)], cwd=cwd,
                          env=_env(), capture_output=True, text=True, timeout=300)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    return err


def test_a_correct_op_passes_and_a_faulty_op_fails_with_a_report(oplib, tmp_path, capsys):
    ok = tmp_path / "ok"
    assert main(["run", "--impl", "op:difftest_oplib::align", "--load", oplib,
                 "--max-examples", "80", "--out", str(ok), "--no-db", "--quiet"]) == 0
    assert json.loads((ok / "run.json").read_text())["impl"] == "op:difftest_oplib::align"
    bad = tmp_path / "bad"
    assert main(["run", "--impl", "op:difftest_oplib::align_faulty", "--load", oplib,
                 "--max-examples", "80", "--shrink-seconds", "10", "--out", str(bad),
                 "--no-db", "--quiet"]) == 1
    out = capsys.readouterr().out
    assert "FAIL align--mismatch--" in out
    bug = next((bad / "bugs").iterdir())
    # the dropped route leaves its expert's segment empty: one route of the last expert
    # is the minimal case
    case = json.loads((bug / "case.json").read_text())
    assert case["topk_ids"]["data"] == [0] and case["num_experts"] == 1
    # repro.py records the library and loads it itself; --load overrides it
    script = bug / "repro.py"
    assert f"LIBRARIES = {json.dumps([oplib])}" in script.read_text()
    run = subprocess.run([sys.executable, str(script)], env=_env(), capture_output=True,
                         text=True, timeout=120, cwd=tmp_path)
    assert run.returncode == 1 and "BUG PRESENT in op:difftest_oplib::align_faulty" in run.stdout
    fixed = subprocess.run([sys.executable, str(script), "--impl", "op:difftest_oplib::align"],
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr
    other = subprocess.run([sys.executable, str(script), "--load", str(tmp_path / "none.so")],
                           env=_env(), capture_output=True, text=True, timeout=120)
    assert other.returncode == 2 and "cannot load op:difftest_oplib::align_faulty" in other.stderr


def test_replay_exit_codes_let_git_bisect_run_find_the_bad_commit(oplib, tmp_path, capsys):
    case = tmp_path / "case.json"
    case.write_text(json.dumps({"dialect": "align", "contract": "production",
                                "topk_ids": {"dtype": "int32", "shape": [1, 1], "data": [0]},
                                "num_experts": 1, "block_size": 1}))
    replay = ["replay", str(case), "--load", oplib, "--impl"]
    assert main(replay + ["op:difftest_oplib::align"]) == 0
    assert main(replay + ["op:difftest_oplib::align_faulty"]) == 1
    assert "on op:difftest_oplib::align_faulty/cpu: mismatch" in capsys.readouterr().out
    # a commit whose build is missing or broken, or lacks the op: 125, bisect skips it
    for args in (["--load", str(tmp_path / "missing.so"), "--impl", "op:difftest_oplib::align"],
                 ["--load", oplib, "--impl", "op:difftest_oplib::not_yet_written"],
                 ["--load", oplib, "--impl", "op:difftest_oplib::two_args"]):
        assert main(["replay", str(case), *args]) == 125
        _one_line_error(capsys)
    # a usage error stays a usage error
    assert main(replay + ["op:not-a-name"]) == 2


WRAPPER = '''
import torch


def align(topk_ids, num_experts, block_size, sorted_token_ids, expert_ids, num_tokens_post_pad,
          expert_map=None):
    torch.ops.difftest_oplib.align(topk_ids, num_experts, block_size, sorted_token_ids,
                                   expert_ids, num_tokens_post_pad, expert_map)
'''


def test_load_serves_a_py_wrapper_in_the_sandbox_worker_too(oplib, tmp_path, monkeypatch):
    (tmp_path / "oplib_wrapper.py").write_text(WRAPPER)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert main(["run", "--impl", "py:oplib_wrapper:align", "--load", oplib,
                 "--max-examples", "20", "--out", str(tmp_path / "out"), "--no-db",
                 "--quiet"]) == 0


def test_list_load_names_each_registered_op_and_its_dialect(oplib):
    done = _difftest("list", "--load", oplib)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split(f"ops registered by {oplib}:\n", 1)[1].splitlines()
    assert [line.split() for line in listed] == [
        ["op:difftest_oplib::align", "align"],
        ["op:difftest_oplib::align_faulty", "align"],
        ["op:difftest_oplib::two_args", "no", "dialect:", "(topk_ids,", "out)"]]


def test_a_library_that_does_not_load_is_one_line_exit_2(tmp_path, capsys):
    missing = tmp_path / "build" / "_moe_C.so"
    assert main(["run", "--impl", "op:_moe_C::moe_align_block_size", "--load",
                 str(missing)]) == 2
    assert f"--load {missing}: no such file" in _one_line_error(capsys)
    garbage = tmp_path / "garbage.so"
    garbage.write_text("not an ELF file\n")
    assert main(["list", "--load", str(garbage)]) == 2
    err = _one_line_error(capsys)
    assert f"--load {garbage}: cannot load it (OSError: " in err


def test_an_op_that_is_not_there_names_what_the_namespace_has(oplib, capsys):
    assert main(["run", "--impl", "op:difftest_oplib::nope", "--load", oplib]) == 2
    assert (f"--impl op:difftest_oplib::nope: no such op; namespace difftest_oplib has align, "
            f"align_faulty, two_args (after loading {oplib})") in _one_line_error(capsys)
    assert main(["run", "--impl", "op:nowhere::align"]) == 2
    assert ("no op of namespace nowhere is registered (no library loaded: pass --load PATH)"
            in _one_line_error(capsys))
    assert main(["run", "--impl", "op:align"]) == 2
    assert "expected op:NAMESPACE::NAME" in _one_line_error(capsys)


def test_the_dialect_is_told_from_the_schema_and_a_mismatch_is_refused(oplib, capsys):
    from difftest import registry

    impl = registry.resolve("op:difftest_oplib::align", load=[oplib])
    assert (impl.kind, impl.dialects, impl.target, impl.libraries) == (
        "op", ("align",), "difftest_oplib::align", (oplib,))
    assert main(["run", "--impl", "op:difftest_oplib::two_args", "--load", oplib]) == 2
    assert ("--impl op:difftest_oplib::two_args: cannot tell its dialect from its signature "
            "(topk_ids, out); pass --dialect" in _one_line_error(capsys))
    assert main(["run", "--impl", "op:difftest_oplib::two_args", "--dialect", "align",
                 "--load", oplib]) == 2
    assert (f"--impl op:difftest_oplib::two_args: align passes 7 arguments: {ALIGN_ARGS}; "
            f"op:difftest_oplib::two_args takes 2") in _one_line_error(capsys)


def test_check_callable_takes_an_op_name_and_its_libraries(oplib, tmp_path):
    from difftest.api import check_callable
    from difftest.errors import LoadError

    ok = check_callable("op:difftest_oplib::align", "align", load=[oplib], max_examples=40,
                        seconds=None, out_dir=tmp_path / "ok", database=None)
    assert ok.passed and ok.result.cases >= 40
    bad = check_callable("op:difftest_oplib::align_faulty", "align", load=[oplib],
                         max_examples=40, seconds=None, out_dir=tmp_path / "bad",
                         database=None, shrink_seconds=5)
    assert not bad.passed and "op:difftest_oplib::align_faulty (align)" in str(bad)
    with pytest.raises(LoadError, match="no such file"):
        check_callable("op:difftest_oplib::align", "align", load=[tmp_path / "no.so"])


FIXTURE_TEST = '''
LIB = {lib!r}


def test_correct_op(difftest_check):
    assert difftest_check("op:difftest_oplib::align", "align", load=[LIB], seconds=2).passed


def test_faulty_op(difftest_check):
    difftest_check("op:difftest_oplib::align_faulty", "align", load=[LIB], seconds=5)
'''


@pytest.mark.slow
def test_the_pytest_fixture_takes_an_op_name(oplib, tmp_path):
    (tmp_path / "test_ops.py").write_text(FIXTURE_TEST.format(lib=oplib))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q", "test_ops.py",
         "--difftest-out", str(tmp_path / "out")],
        cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "1 failed, 1 passed" in done.stdout
    assert "FAILED align--mismatch--" in done.stdout
    assert "PASSED  op:difftest_oplib::align [align]" in done.stdout
