"""reports: run logs, summary page, bug reports, JUnit XML."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import textwrap
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import reports

ROOT = Path(__file__).resolve().parents[1]
MESSAGE = "expert_ids[3]: expected 2, actual 0"

CASE_FIELDS = [
    ("case_id", pa.string()),
    ("impl", pa.string()),
    ("dialect", pa.string()),
    ("contract", pa.string()),
    ("edge_classes", pa.list_(pa.string())),
    ("T", pa.int64()),
    ("K", pa.int64()),
    ("E", pa.int64()),
    ("B", pa.int64()),
    ("L", pa.int64()),
    ("P", pa.int64()),
    ("R", pa.int64()),
    ("rank", pa.int64()),
    ("dtype", pa.string()),
    ("seed", pa.int64()),
    ("verdict", pa.string()),
    ("elapsed_s", pa.float64()),
    ("worker", pa.string()),
    ("checks_failed", pa.list_(pa.string())),
]
MISMATCH_FIELDS = [
    ("case_id", pa.string()),
    ("impl", pa.string()),
    ("dialect", pa.string()),
    ("check", pa.string()),
    ("rank", pa.int64()),
    ("slot", pa.int64()),
    ("expert", pa.int64()),
    ("position", pa.int64()),
    ("expected", pa.int64()),
    ("actual", pa.int64()),
    ("verdict", pa.string()),
    ("message", pa.string()),
]


def case_row(
    case_id,
    *,
    impl="torch",
    contract="production",
    edge_classes=("base-only",),
    verdict="pass",
    elapsed_s=0.5,
    **extra,
):
    row = {
        "case_id": case_id,
        "impl": impl,
        "dialect": "vllm-lora",
        "contract": contract,
        "edge_classes": list(edge_classes),
        "T": 4, "K": 2, "E": 8, "B": 16, "L": 2, "P": 64,
        "dtype": "int32",
        "seed": 7,
        "verdict": verdict,
        "elapsed_s": elapsed_s,
        "checks_failed": [] if verdict == "pass" else ["expert_ids"],
    }
    row.update(extra)
    return row


def mismatch_row(case_id, *, impl="torch", check="expert_ids", message=MESSAGE):
    return {
        "case_id": case_id, "impl": impl, "dialect": "vllm-lora", "check": check, "rank": None,
        "slot": 1, "expert": 2, "position": 3, "expected": 2, "actual": 0,
        "verdict": "mismatch", "message": message,
    }


def schema_fields(path):
    return [(field.name, field.type) for field in pq.read_schema(path)]


def case_ids(path):
    return pq.read_table(path).column("case_id").to_pylist()


def table_row(impl, edge_class, *cells):
    tds = "".join(
        f'<td class="{kind}">{text}</td>' for kind, text in (c.split(":", 1) for c in cells)
    )
    return f'<tr><td class="label">{impl}</td><td class="label">{edge_class}</td>{tds}</tr>'




def test_empty_log_writes_both_tables_with_the_exact_schema(tmp_path):
    with reports.RunLog(tmp_path / "run"):
        pass
    assert schema_fields(tmp_path / "run" / "cases.parquet") == CASE_FIELDS
    assert schema_fields(tmp_path / "run" / "mismatches.parquet") == MISMATCH_FIELDS
    assert pq.read_table(tmp_path / "run" / "cases.parquet").num_rows == 0
    assert pq.read_table(tmp_path / "run" / "mismatches.parquet").num_rows == 0
    assert reports.CASE_COLUMNS == tuple(name for name, _ in CASE_FIELDS)
    assert reports.MISMATCH_COLUMNS == tuple(name for name, _ in MISMATCH_FIELDS)


def test_rows_round_trip_with_missing_keys_as_null_and_numpy_scalars_as_ints(tmp_path):
    with reports.RunLog(tmp_path) as log:
        log.add_case(
            case_row("c1", T=np.int32(5), elapsed_s=np.float32(0.25), edge_classes=("a", "b"))
        )
        log.add_mismatches([mismatch_row("c1")])
    cases = pq.read_table(tmp_path / "cases.parquet")
    assert schema_fields(tmp_path / "cases.parquet") == CASE_FIELDS
    assert schema_fields(tmp_path / "mismatches.parquet") == MISMATCH_FIELDS
    assert cases.to_pylist() == [{
        "case_id": "c1", "impl": "torch", "dialect": "vllm-lora", "contract": "production",
        "edge_classes": ["a", "b"], "T": 5, "K": 2, "E": 8, "B": 16, "L": 2, "P": 64,
        "R": None, "rank": None, "dtype": "int32", "seed": 7, "verdict": "pass",
        "elapsed_s": 0.25, "worker": None, "checks_failed": [],
    }]
    assert pq.read_table(tmp_path / "mismatches.parquet").to_pylist() == [mismatch_row("c1")]


def test_unknown_key_is_a_value_error_naming_it_and_nothing_is_journalled(tmp_path):
    with reports.RunLog(tmp_path) as log:
        with pytest.raises(ValueError, match="'edge_class'.*did you mean 'edge_classes'"):
            log.add_case({"case_id": "c1", "edge_class": ["base-only"]})
        with pytest.raises(ValueError, match="'slots'"):
            log.add_mismatches([mismatch_row("c1"), {"case_id": "c1", "slots": 3}])
        assert (log.num_cases, log.num_mismatches) == (0, 0)
    assert (tmp_path / "cases.jsonl").read_text() == ""
    assert (tmp_path / "mismatches.jsonl").read_text() == ""


def test_wrong_types_and_unknown_verdicts_are_rejected(tmp_path):
    with reports.RunLog(tmp_path) as log:
        with pytest.raises(TypeError, match="'T' must be an int"):
            log.add_case({"T": 3.0})
        with pytest.raises(TypeError, match="'edge_classes' must be a list of str"):
            log.add_case({"edge_classes": "base-only"})
        with pytest.raises(ValueError, match="verdict='passed'"):
            log.add_case({"verdict": "passed"})


def test_parquet_follows_the_journal_only_every_interval_and_on_flush(tmp_path):
    with reports.RunLog(tmp_path, parquet_interval_s=3600) as log:
        log.add_case(case_row("c1"))
        assert pq.read_table(tmp_path / "cases.parquet").num_rows == 0
        assert len((tmp_path / "cases.jsonl").read_text().splitlines()) == 1
        log.flush()
        assert pq.read_table(tmp_path / "cases.parquet").num_rows == 1
    with reports.RunLog(tmp_path, parquet_interval_s=0) as log:
        log.add_case(case_row("c2"))
        assert case_ids(tmp_path / "cases.parquet") == ["c1", "c2"]
    assert [p.name for p in tmp_path.iterdir() if p.name.endswith(".tmp")] == []


def test_a_killed_run_keeps_every_row_and_rebuild_parquet_recovers_them(tmp_path):
    script = textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(ROOT)!r})
        import reports
        log = reports.RunLog({str(tmp_path)!r}, parquet_interval_s=3600)
        for i in range(50):
            log.add_case({{"case_id": f"c{{i}}", "verdict": "pass" if i % 5 else "mismatch"}})
            if i % 5 == 0:
                log.add_mismatches([{{"case_id": f"c{{i}}", "check": "expert_ids"}}])
        os.kill(os.getpid(), signal.SIGKILL)
    """)
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=60)
    assert result.returncode == -9, result.stderr.decode()
    assert pq.read_table(tmp_path / "cases.parquet").num_rows == 0  # never flushed

    assert reports.rebuild_parquet(tmp_path) == (50, 10)
    cases = pq.read_table(tmp_path / "cases.parquet")
    assert cases.column("case_id").to_pylist() == [f"c{i}" for i in range(50)]
    assert cases.column("verdict").to_pylist().count("mismatch") == 10
    assert case_ids(tmp_path / "mismatches.parquet") == [f"c{i}" for i in range(0, 50, 5)]
    assert schema_fields(tmp_path / "cases.parquet") == CASE_FIELDS


def test_a_torn_last_journal_line_is_dropped_and_a_reopened_log_appends_cleanly(tmp_path):
    with reports.RunLog(tmp_path) as log:
        log.add_case(case_row("c1"))
    with open(tmp_path / "cases.jsonl", "a") as journal:
        journal.write('{"case_id": "c2", "imp')  # killed mid-write
    assert reports.rebuild_parquet(tmp_path) == (1, 0)
    with reports.RunLog(tmp_path) as log:
        assert log.num_cases == 1
        log.add_case(case_row("c3"))
    assert case_ids(tmp_path / "cases.parquet") == ["c1", "c3"]
    assert len((tmp_path / "cases.jsonl").read_text().splitlines()) == 2


def test_a_bad_journal_line_is_reported_with_its_file_and_line_number(tmp_path):
    with reports.RunLog(tmp_path) as log:
        log.add_case(case_row("c1"))
    with open(tmp_path / "cases.jsonl", "a") as journal:
        journal.write('{"case_id": "c2", "verdict": "passed"}\n{"case_id": "c3"}\n')
    with pytest.raises(ValueError, match=r"cases\.jsonl:2: unreadable journal line: .*'passed'"):
        reports.read_rows(tmp_path)


def test_read_rows_falls_back_to_parquet_when_there_is_no_journal(tmp_path):
    with reports.RunLog(tmp_path) as log:
        log.add_case(case_row("c1"))
        log.add_mismatches([mismatch_row("c1")])
    (tmp_path / "cases.jsonl").unlink()
    (tmp_path / "mismatches.jsonl").unlink()
    cases, mismatches = reports.read_rows(tmp_path)
    assert [row["case_id"] for row in cases] == ["c1"]
    assert mismatches == [mismatch_row("c1")]
    assert reports.rebuild_parquet(tmp_path) == (1, 1)  # parquet kept, not emptied
    assert case_ids(tmp_path / "cases.parquet") == ["c1"]
    with reports.RunLog(tmp_path) as log:  # the parquet rows seed a new journal
        log.add_case(case_row("c2"))
    assert reports.rebuild_parquet(tmp_path) == (2, 1)
    assert case_ids(tmp_path / "cases.parquet") == ["c1", "c2"]


def test_merge_runs_concatenates_rows_and_copies_cases_and_bugs(tmp_path):
    parts = [tmp_path / "gpu0", tmp_path / "gpu1"]
    for index, part in enumerate(parts):
        with reports.RunLog(part) as log:
            log.add_case(case_row(f"p{index}-ok", worker=f"gpu{index}"))
            log.add_case(case_row(f"p{index}-bad", verdict="mismatch", worker=f"gpu{index}"))
            log.add_mismatches([mismatch_row(f"p{index}-bad")])
        (part / "cases").mkdir()
        (part / "cases" / f"p{index}-bad.json").write_text(json.dumps({"part": index}))
        (part / "bugs" / "same-bug").mkdir(parents=True)
        (part / "bugs" / "same-bug" / "report.md").write_text(f"# from part {index}\n")
    (parts[1] / "bugs" / "other-bug").mkdir()

    assert reports.merge_runs(tmp_path / "all", parts) == (4, 2)
    merged = tmp_path / "all"
    assert case_ids(merged / "cases.parquet") == ["p0-ok", "p0-bad", "p1-ok", "p1-bad"]
    workers = pq.read_table(merged / "cases.parquet").column("worker").to_pylist()
    assert workers == ["gpu0", "gpu0", "gpu1", "gpu1"]
    assert case_ids(merged / "mismatches.parquet") == ["p0-bad", "p1-bad"]
    assert sorted(p.name for p in (merged / "cases").iterdir()) == ["p0-bad.json", "p1-bad.json"]
    assert sorted(p.name for p in (merged / "bugs").iterdir()) == ["other-bug", "same-bug"]
    assert (merged / "bugs" / "same-bug" / "report.md").read_text() == "# from part 0\n"
    with pytest.raises(ValueError, match="part_dirs\\[0\\]"):
        reports.merge_runs(tmp_path / "all", [tmp_path / "missing"])




def write_sample_run(run):
    with reports.RunLog(run) as log:
        log.add_case(case_row("c1"))
        log.add_case(case_row("c2", verdict="mismatch", edge_classes=("base-only", "hot-expert")))
        log.add_case(case_row("c3", contract="defensive", edge_classes=()))
        log.add_case(case_row("c4", impl="cuda<&>", verdict="crash", elapsed_s=2.0))
        log.add_mismatches([mismatch_row("c2"), mismatch_row("c2", check="sorted_token_ids")])


def test_summary_has_the_pass_fail_cells_check_counts_and_embedded_plots(tmp_path):
    write_sample_run(tmp_path)
    (tmp_path / "bugs" / "torch-slot-2").mkdir(parents=True)
    (tmp_path / "bugs" / "torch-slot-2" / "report.md").write_text("# Slot <2> is never written\n")
    page = reports.write_summary(tmp_path).read_text()

    assert '<p class="headline">4 cases, <span class="bad">2 failures</span></p>' in page
    assert "<li>Verdicts: pass: 2, mismatch: 1, crash: 1</li>" in page
    # columns: defensive, production, all
    assert table_row("torch", "base-only", "empty:—", "fail:1/2", "fail:1/2") in page
    assert table_row("torch", "hot-expert", "empty:—", "fail:1/1", "fail:1/1") in page
    assert table_row("torch", "no-edge-class", "pass:0/1", "empty:—", "pass:0/1") in page
    assert table_row("cuda&lt;&amp;&gt;", "base-only", "empty:—", "fail:1/1", "fail:1/1") in page
    assert "cuda<&>" not in page
    assert '<tr><td class="label">expert_ids</td><td>1</td><td>1</td></tr>' in page
    assert '<tr><td class="label">sorted_token_ids</td><td>1</td><td>1</td></tr>' in page
    assert "Slot &lt;2&gt; is never written" in page
    assert '<a href="bugs/torch-slot-2/report.md">report.md</a>' in page
    assert page.count('<img alt="') == 3
    assert page.count('src="data:image/png;base64,iVBORw0KGgo') == 3
    assert "http://" not in page and "https://" not in page


def test_summary_lists_bugs_first_each_failing_case_once_and_the_contract_split(tmp_path):
    with reports.RunLog(tmp_path) as log:
        for k in range(3):
            log.add_case(case_row(f"p{k}"))
        for _ in range(5):  # one case replayed and found again: one row
            log.add_case(case_row("d0", contract="defensive", verdict="mismatch"))
        log.add_case(case_row("d1", contract="defensive"))
    (tmp_path / "bugs" / "vllm-lora--mismatch--expert_ids").mkdir(parents=True)
    (tmp_path / "bugs" / "vllm-lora--mismatch--expert_ids" / "report.md").write_text("# bug\n")
    page = reports.write_summary(tmp_path).read_text()
    assert page.index("<h2>Bug reports</h2>") < page.index("<h2>Pass/fail by") < page.index(
        "<h2>Failing cases</h2>")
    failing = page[page.index("<h2>Failing cases</h2>"):page.index("<h2>Plots</h2>")]
    assert failing.count("<tr><td") == 1 and ">d0<" in failing
    assert (
        '<p class="bad">torch passes the production contract (3 cases: the inputs a serving '
        "stack sends) and fails the defensive contract (5 of 6 cases: inputs outside the "
        "production contract, which a careful kernel must survive without writing out of "
        "bounds).</p>") in page
    assert page.index("passes the production contract") < page.index("<h2>Bug reports</h2>")


def test_contract_split_is_said_only_when_one_contract_passes_and_the_other_fails():
    rows = [{"impl": "a", "contract": "production", "verdict": "mismatch"},
            {"impl": "a", "contract": "defensive", "verdict": "pass"},
            {"impl": "b", "contract": "production", "verdict": "pass"},
            {"impl": "b", "contract": "defensive", "verdict": "crash"},
            {"impl": "c", "contract": "production", "verdict": "mismatch"},
            {"impl": "c", "contract": "defensive", "verdict": "crash"},
            {"impl": "d", "contract": "production", "verdict": "pass"}]
    assert reports.contract_split(rows) == [
        "a passes the defensive contract (1 case: inputs outside the production contract, "
        "which a careful kernel must survive without writing out of bounds) and fails the "
        "production contract (1 of 1 case: the inputs a serving stack sends)",
        "b passes the production contract (1 case: the inputs a serving stack sends) and fails "
        "the defensive contract (1 of 1 case: inputs outside the production contract, which a "
        "careful kernel must survive without writing out of bounds)"]


def test_summary_of_an_empty_run_is_a_complete_page(tmp_path):
    with reports.RunLog(tmp_path):
        pass
    page = reports.write_summary(tmp_path).read_text()
    assert page.startswith("<!DOCTYPE html>") and page.endswith("</html>\n")
    assert '<p class="headline">0 cases, 0 failures</p>' in page
    assert page.count("No cases recorded.") == 2
    assert "<img" not in page



REPRO = "#!/usr/bin/env python3\r\n# keeps CRLF and no final newline\nprint('repro')"


def bug_info(**extra):
    info = {
        "title": "Slot 2's row is never written when base tokens are present",
        "impl": "torch:grid-skips-last-slot",
        "dialect": "vllm-lora",
        "contract": "production",
        "edge_classes": ["full-slots-with-base"],
        "case": {"dialect": "vllm-lora", "topk_ids": [[1, 0]], "dtype": "int32"},
        "inputs": {
            "topk_ids": [[1, 0], [2, 3]],
            "num_experts": 4,
            "max_num_tokens_padded": None,
            "lora_ids": list(range(100)),
        },
        "first_difference": {
            "check": "num_tokens_post_pad", "slot": 2, "expert": None, "position": None,
            "expected": 16, "actual": -559038737,
            "message": "slot 2: num_tokens_post_pad differs\nexpected: [16]\nactual: [-559038737]",
        },
        "mismatches": [
            {"check": "sorted_token_ids", "position": i, "message": "a|b"} for i in range(25)
        ],
        "expected_actual": {
            "sorted_token_ids": {
                "expected": list(range(100)),
                "actual": list(range(60)) + [-1] + list(range(61, 100)),
            }
        },
        "environment": {"Python": "3.11.7", "torch": None, "packages": {"numpy": "2.4.6"}},
        "repro_py": REPRO,
        "sanitizer": "========= Invalid __global__ write of size 4",
        "shrink_log": ["drop tokens", "lower num_experts"],
        "cases_until_failure": 17,
    }
    info.update(extra)
    return info


def test_bug_report_writes_the_three_files_and_the_script_verbatim(tmp_path):
    bug_dir = reports.write_bug_report(tmp_path, "vllm-lora.grid-skips-last-slot_2", bug_info())
    assert bug_dir == tmp_path / "bugs" / "vllm-lora.grid-skips-last-slot_2"
    assert sorted(p.name for p in bug_dir.iterdir()) == ["case.json", "report.md", "repro.py"]
    assert (bug_dir / "repro.py").read_bytes() == REPRO.encode()
    assert os.stat(bug_dir / "repro.py").st_mode & stat.S_IXUSR
    assert json.loads((bug_dir / "case.json").read_text()) == bug_info()["case"]
    assert (bug_dir / "case.json").read_text().startswith('{\n  "dialect": "vllm-lora",')


def test_bug_report_markdown_has_every_section_and_truncates_long_rows(tmp_path):
    report = (reports.write_bug_report(tmp_path, "b1", bug_info()) / "report.md").read_text()
    assert report.splitlines()[0] == "# Slot 2's row is never written when base tokens are present"
    headings = [line for line in report.splitlines() if line.startswith("## ")]
    assert headings == ["## What failed", "## Minimal case", "## Expected vs actual",
                        "## Classes and contract", "## Reproduce", "## Environment",
                        "## compute-sanitizer"]
    assert ("- Check: `num_tokens_post_pad` (what each check and verdict means: "
            "docs/SPEC.md §9 and §12 of moe-align-difftest)\n- Found after 17 cases\n") in report
    assert "Message:\n\n```\nslot 2: num_tokens_post_pad differs\nexpected: [16]\n" in report
    assert "25 mismatches (first 20 shown):" in report
    assert "| `num_experts` | 4 |\n| `max_num_tokens_padded` | None |\n" in report
    assert "| sorted_token_ids | 19 | a\\|b |" in report
    assert "| sorted_token_ids | 20 |" not in report
    assert "| 1 | 2 | 3 |" in report  # row 1 of topk_ids
    head, tail = " | ".join(map(str, range(32))), " | ".join(map(str, range(92, 100)))
    assert f"| value | {head} | … | {tail} |" in report
    assert (
        "First difference: `num_tokens_post_pad` at slot 2: expected `16`, actual `-559038737`."
        in report
    )
    assert "`sorted_token_ids` (first difference at index 60):" in report
    assert "| 31 | … | 57 | 58 | 59 | **60** | 61 | 62 | 63 | … | 92 |" in report
    assert "| 59 | **60** | 61 |" in report and "| 59 | **-1** | 61 |" in report
    assert "difftest replay case.json --impl torch:grid-skips-last-slot" in report
    assert "```sh\npython repro.py\n```" in report
    assert "| torch | n/a |" in report and "| packages / numpy | 2.4.6 |" in report
    assert "```\n========= Invalid __global__ write of size 4\n```" in report
    assert "- Edge classes: `full-slots-with-base`" in report


@pytest.mark.parametrize("signature", ["", ".", "..", "a/b", "../up", "with space", "é"])
def test_bug_report_rejects_a_signature_that_is_not_a_safe_slug(tmp_path, signature):
    with pytest.raises(ValueError, match="signature="):
        reports.write_bug_report(tmp_path, signature, bug_info())
    assert not (tmp_path / "bugs").exists()


def test_bug_report_rejects_unknown_and_missing_info_keys(tmp_path):
    with pytest.raises(ValueError, match="unknown key 'titel'"):
        reports.write_bug_report(tmp_path, "b", bug_info(titel="x"))
    info = bug_info()
    del info["repro_py"]
    with pytest.raises(ValueError, match="missing required key 'repro_py'"):
        reports.write_bug_report(tmp_path, "b", info)


def test_environment_never_imports_torch():
    script = textwrap.dedent(f"""
        import importlib.metadata, sys
        sys.path.insert(0, {str(ROOT)!r})
        import reports
        env = reports.environment()
        assert "torch" not in sys.modules
        assert env["torch"] == importlib.metadata.version("torch"), env["torch"]
        print(sorted(env), env["packages"]["pyarrow"] is not None)
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    keys = "['CUDA', 'GPU', 'Python', 'driver', 'packages', 'platform', 'torch']"
    assert result.stdout == f"{keys} True\n"


def test_environment_reads_torch_and_its_cuda_from_the_installation(tmp_path):
    # A campaign's process never imports torch; its report still names the torch and the
    # CUDA its workers ran (the same installation), read from torch/version.py as text.
    fake = tmp_path / "torch"
    fake.mkdir()
    (fake / "__init__.py").write_text("raise ImportError('must not be imported')\n")
    (fake / "version.py").write_text("from typing import Optional\n__version__ = '9.9.9+cu130'\n"
                                     "debug = False\ncuda: Optional[str] = '13.0'\n"
                                     "hip: Optional[str] = None\n")
    script = textwrap.dedent(f"""
        import sys
        sys.path[:0] = [{str(tmp_path)!r}, {str(ROOT)!r}]
        import reports
        env = reports.environment()
        assert "torch" not in sys.modules
        print(env["torch"], env["CUDA"])
    """)
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == "9.9.9+cu130 13.0\n"


def failure_record(signature, *, impl="torch", verdict="mismatch", count=1, **extra):
    return {"signature": signature, "impl": impl, "dialect": "vllm-lora", "verdict": verdict,
            "contract": "production", "count": count, "first_after": 2,
            "minimal": "T=1 K=1 E=2 B=1 L=1 P=2 (production size); topk_ids=[[1]]",
            "message": "expert_ids[0]: expected 1, actual 0\x1b[0m",
            "report": f"out/bugs/{signature}", **extra}


def test_junit_has_one_testcase_per_bug_and_one_per_class_and_contract_that_passed(tmp_path):
    cases = [
        case_row("c1"),
        case_row("c2", verdict="mismatch", edge_classes=("base-only", "hot-expert"),
                 elapsed_s=1.25),
        case_row("c3", contract="defensive", edge_classes=()),
        case_row("c4", impl="cuda", verdict="crash"),
        case_row("c5", edge_classes=("int64-ids",), elapsed_s=0.25),
    ]
    failures = [failure_record("vllm-lora--mismatch--expert_ids", count=3),
                failure_record("vllm-lora--crash--cuda-illegal-address", impl="cuda",
                               verdict="crash", message="")]
    path = reports.write_junit(tmp_path / "out" / "junit.xml", cases, failures)
    suite = ET.parse(path).getroot()
    assert suite.tag == "testsuite"
    assert suite.attrib == {
        "name": "difftest", "tests": "4", "failures": "1", "errors": "1", "skipped": "0",
        "time": "3.000",
    }
    testcases = {(tc.get("classname"), tc.get("name")): tc for tc in suite.iter("testcase")}
    # base-only[production] and hot-expert[production] had a failing case: the bug stands
    # for them; int64-ids and the untagged defensive case passed
    assert list(testcases) == [
        ("difftest.cuda.vllm-lora", "vllm-lora--crash--cuda-illegal-address"),
        ("difftest.torch.vllm-lora", "vllm-lora--mismatch--expert_ids"),
        ("difftest.torch.vllm-lora", "int64-ids[production]"),
        ("difftest.torch.vllm-lora", "no-edge-class[defensive]"),
    ]
    bug = testcases[("difftest.torch.vllm-lora", "vllm-lora--mismatch--expert_ids")]
    failure = bug.find("failure")
    assert failure.get("type") == "difftest.mismatch" and bug.find("error") is None
    assert failure.get("message") == failure.text == (
        "mismatch: 3 failing cases (production contract), first after 2 cases\n"
        "minimal case: T=1 K=1 E=2 B=1 L=1 P=2 (production size); topk_ids=[[1]]\n"
        "first difference: expert_ids[0]: expected 1, actual 0\ufffd[0m\n"
        "report: out/bugs/vllm-lora--mismatch--expert_ids")
    crash = testcases[("difftest.cuda.vllm-lora", "vllm-lora--crash--cuda-illegal-address")]
    assert crash.find("failure") is None
    assert crash.find("error").get("type") == "difftest.crash"
    assert crash.find("error").text.splitlines()[0] == "crash: 1 failing case (production " \
        "contract), first after 2 cases"
    passed = testcases[("difftest.torch.vllm-lora", "int64-ids[production]")]
    assert passed.get("time") == "0.250" and len(passed) == 0
    assert len(testcases[("difftest.torch.vllm-lora", "no-edge-class[defensive]")]) == 0


def test_junit_refuses_a_failure_without_its_report_path(tmp_path):
    record = failure_record("s")
    del record["report"]
    with pytest.raises(ValueError, match="failures\\[0\\] has no 'report'"):
        reports.write_junit(tmp_path / "junit.xml", [case_row("c1")], [record])


def test_a_timeout_report_says_what_happened_not_expected_none():
    from reports.bugreport import render_report

    detail = "no answer within 10 s, nor within 40 s on a fresh worker; worker killed"
    report = render_report(bug_info(verdict="timeout", first_difference={
        "check": "timeout", "message": detail, "expected": None, "actual": None},
        mismatches=[]))
    assert "- Verdict: `timeout` — the call did not return within its time budget" in report
    assert (f"No output to compare: the call did not return within its time budget (confirmed "
            f"on a fresh worker). What happened: `{detail}`") in report
    assert "`None`" not in report.split("## Expected vs actual")[1].split("##")[0]
