"""train.py's ``--threads`` option and benchmarks/cpu_threads.py (epoch seconds by thread setting)."""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path

import pytest
import torch

from train import main as train_main

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import cpu_threads  # noqa: E402


@pytest.fixture()
def restore_threads():
    """The test process's intra-op thread count is put back whatever the test set."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


def fit_fast_dev_run(root: Path, *extra: str) -> None:
    train_main(
        [
            "fit",
            "--config",
            str(ROOT / "configs" / "retain.yaml"),
            f"--data.init_args.root={root}",
            "--trainer.fast_dev_run=true",
            *extra,
        ]
    )


@pytest.mark.parametrize(
    ("options", "before", "after"),
    [
        ([], 3, 1),  # the default is one thread, whatever the process had
        (["--threads", "2"], 1, 2),
        (["--threads", "all"], 3, 3),  # 'all' leaves torch's own setting alone
    ],
)
def test_threads_option_sets_the_intra_op_thread_count(
    options, before, after, tiny_cohort_dir, tmp_path, monkeypatch, restore_threads
):
    monkeypatch.chdir(tmp_path)
    torch.set_num_threads(before)
    fit_fast_dev_run(tiny_cohort_dir, *options)
    assert torch.get_num_threads() == after


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_threads_option_refuses_what_is_not_a_positive_count_or_all(value, capsys, restore_threads):
    threads = torch.get_num_threads()
    with pytest.raises(SystemExit) as exit_info:
        train_main(["fit", "--config", str(ROOT / "configs" / "retain.yaml"), "--threads", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"medrec: error: option --threads = {value}:"), err
    assert torch.get_num_threads() == threads


def test_measured_run_is_the_user_command_plus_bounds():
    command = cpu_threads.train_command("retain", "/data", 7, "default", "/logs")
    assert command[1:6] == ["train.py", "fit", "--config", "configs/retain.yaml", "--data.init_args.root=/data"]
    assert "--trainer.limit_train_batches=7" in command and "--trainer.max_epochs=1" in command
    assert "--threads" not in command  # the default is what a user gets by typing nothing
    assert cpu_threads.train_command("retain", None, 7, "all", "/logs")[-2:] == ["--threads", "all"]
    assert not any(a.startswith("--data") for a in cpu_threads.train_command("retain", None, 7, "1", "/logs"))


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a running process (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / 100  # utime, stime in clock ticks (USER_HZ = 100)


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="needs Linux /proc")
def test_busy_process_spins_during_the_block_and_is_gone_after():
    with cpu_threads.busy_process(True) as process:
        start = cpu_seconds(process.pid)
        time.sleep(1.0)
        assert process.poll() is None
        assert cpu_seconds(process.pid) - start > 0.3  # it burns CPU (at least a share of a core)
    assert process.poll() is not None
    with cpu_threads.busy_process(False) as nothing:
        assert nothing is None


def test_benchmark_end_to_end_writes_the_table_and_json(tiny_cohort_dir, tmp_path):
    out = tmp_path / "report"
    argv = ["--out", str(out), "--data", str(tiny_cohort_dir), "--methods", "retain", "--batches", "2"]
    report = cpu_threads.main([*argv, "--conditions", "quiet"])

    assert json.loads((out / "cpu_threads.json").read_text()) == json.loads(json.dumps(report))
    text = (out / "cpu_threads.md").read_text()
    lines = text.splitlines()
    # a report starts with the exact command, commit and config hash that produced it (benchmarks/provenance.py)
    assert lines[0] == f"Command: `python benchmarks/cpu_threads.py {' '.join(argv)} --conditions quiet`  "
    assert re.fullmatch(r"Commit: `[0-9a-f]{40}`( \(with uncommitted changes\))?  ", lines[1])
    assert lines[2] == f"Config hash: `{report['provenance']['config_hash']}`"
    assert report["provenance"]["command"] == lines[0][len("Command: `") : -len("`  ")]
    assert "--trainer.limit_train_batches=2" in text
    assert re.search(r"train.py's default at this commit: (\d+|all)\)", text)  # read from --print_config

    (row,) = report["rows"]
    assert (row["method"], row["condition"]) == ("retain", "quiet")
    seconds = row["seconds"]
    assert set(seconds) == {"default", "1", "all"} and all(s > 0 for s in seconds.values())
    assert row["best"] == min(seconds, key=seconds.get)
    assert row["default_over_best"] >= 1.0
    assert row["default_over_best"] == pytest.approx(seconds["default"] / min(seconds.values()), rel=0.02, abs=0.01)
    assert row["all_over_1"] == pytest.approx(seconds["all"] / seconds["1"], rel=0.02, abs=0.01)
    assert report["worst"] == row

    table = [line for line in lines if line.startswith("| retain |")]
    assert len(table) == 1
    cells = [c.strip() for c in table[0].strip("|").split("|")]
    assert cells[1] == "no"
    assert [float(c) for c in cells[2:5]] == pytest.approx(
        [seconds["default"], seconds["1"], seconds["all"]], abs=0.006
    )
    assert float(cells[5]) == pytest.approx(row["default_over_best"], abs=0.006)
    assert f"Worst case default / best: **{row['default_over_best']:.2f}×** (retain, quiet machine)" in text


def test_benchmark_refuses_unknown_method_and_bad_counts(tmp_path, capsys):
    for argv in (["--methods", "nosuch"], ["--batches", "0"], ["--data", str(tmp_path / "absent")]):
        with pytest.raises(SystemExit):
            cpu_threads.main(["--out", str(tmp_path), *argv])
    assert "no configs/nosuch.yaml" in capsys.readouterr().err
