"""benchmarks/provenance.py: the header every report starts with, and every report writer using it."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import provenance  # noqa: E402
from benchmarks.provenance import Provenance  # noqa: E402

BENCHMARKS = ROOT / "benchmarks"
SHARED = {"__init__.py", "provenance.py", "grid.py", "synthetic_raw.py"}  # modules and a fixture
# Committed reports written before the header existed: research notes quoting many runs, or measured
# on real data (minutes to hours of CPU); each leaves this list when its command regenerates it.
WITHOUT_HEADER = {
    "cpu_threads.md",  # command and commit, no config hash
    "dpr_interpretability.md",
    "dpr_mimic3.md",
    "dpr_synthetic.md",
    "gamenet.md",
    "safedrug.md",
    "miranda_seeds.md",
    "miranda_demo_elos.md",
    "leaderboard_131/report.md",
    "miranda_structure/structure.md",
    # first runs of the peer methods (issue 26), made on their branches before run.py wrote the header
    "peers.md",
    "raremed.md",
}


def test_header_names_command_commit_and_config_hash(tmp_path):
    prov = Provenance.capture("benchmarks/x.py", ["--out", "a b", "--seed", 3], config={"seed": 3})
    assert prov.command == "python benchmarks/x.py --out 'a b' --seed 3"  # shell-quoted: it runs as printed
    assert re.fullmatch(r"[0-9a-f]{40}", prov.commit) and isinstance(prov.dirty, bool)
    assert prov.config_hash == provenance.config_hash({"seed": 3}) and re.fullmatch(r"[0-9a-f]{12}", prov.config_hash)
    text = provenance.write_markdown(tmp_path / "r.md", "# body\n", prov)
    assert text == (tmp_path / "r.md").read_text()
    assert text.endswith("`\n\n# body\n")
    assert provenance.read_markdown_header(text) == {
        "Command": prov.command,
        "Commit": prov.commit,
        "Config hash": prov.config_hash,
    }
    saved = provenance.write_json(tmp_path / "r.json", [{"a": 1}], prov)
    assert json.loads((tmp_path / "r.json").read_text()) == saved == {"provenance": prov.fields(), "rows": [{"a": 1}]}


def test_config_hash_follows_content_not_order_or_output(tmp_path):
    assert provenance.config_hash({"a": 1, "b": [2]}) == provenance.config_hash({"b": [2], "a": 1})
    assert provenance.config_hash({"a": 1}) != provenance.config_hash({"a": 2})
    config = tmp_path / "m.yaml"
    config.write_text("model: 1\n")
    before = provenance.run_config_hash(str(config), None, 2, 0, ["--x=1"])
    assert before == provenance.run_config_hash(str(config), None, 2, 0, ["--x=1"])
    assert before != provenance.run_config_hash(str(config), None, 2, 1, ["--x=1"])
    assert before != provenance.run_config_hash(str(config), None, 2, 0, ["--x=2"])
    config.write_text("model: 2\n")  # an edited config is another run
    assert before != provenance.run_config_hash(str(config), None, 2, 0, ["--x=1"])


def report_writers() -> list[Path]:
    writes = re.compile(r"write_text\(|savefig\(|to_csv\(|write_json\(|write_markdown\(")
    return sorted(p for p in BENCHMARKS.glob("*.py") if p.name not in SHARED and writes.search(p.read_text()))


@pytest.mark.parametrize("script", report_writers(), ids=lambda p: p.name)
def test_every_report_writer_writes_the_header(script):
    source = script.read_text()
    assert "Provenance.capture(" in source, f"{script.name} writes files without a provenance header"
    # a report (.md/.json named in the source) goes through write_markdown / write_json, not write_text
    raw = re.findall(r'"[\w.{}-]*\.(?:md|json)"\)\.write_text\(', source)
    assert not raw, f"{script.name} writes {raw} without the header"


def test_no_script_reaches_into_another_folder():
    for script in BENCHMARKS.glob("*.py"):
        source = script.read_text()
        assert source.count("sys.path.insert") <= 1, script.name
        assert '"tests"' not in source and "conftest" not in source, script.name
        # sibling scripts are imported as benchmarks.<module>, never as top-level modules
        siblings = {p.stem for p in BENCHMARKS.glob("*.py")} - {"__init__"}
        assert not re.findall(rf"^(?:from|import) ({'|'.join(siblings)})\b", source, re.M), script.name


def test_committed_reports_start_with_the_header():
    reports = {str(p.relative_to(BENCHMARKS / "reports")): p for p in (BENCHMARKS / "reports").rglob("*.md")}
    assert WITHOUT_HEADER <= set(reports), WITHOUT_HEADER - set(reports)
    for name, path in reports.items():
        header = provenance.read_markdown_header(path.read_text())
        if name in WITHOUT_HEADER:
            continue
        assert set(header) == set(provenance.MARKDOWN_FIELDS), f"{name} lacks the provenance header"
        assert header["Command"].startswith("python benchmarks/"), name
