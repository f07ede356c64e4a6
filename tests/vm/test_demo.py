"""`harness demo` ends by printing the path of its Markdown report, with the
PNG plots it links beside it."""

import os
import re
import subprocess
import sys
from pathlib import Path


def test_demo_prints_its_report_last(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harness.cli", "demo"], capture_output=True,
                       text=True, timeout=600, env={**os.environ, "HARNESS_RUN_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    report = Path(r.stdout.strip().splitlines()[-1])
    assert report.name == "report.md" and report.is_relative_to(tmp_path)
    text = report.read_text()
    plots = re.findall(r"!\[[^\]]*\]\(([^)]+\.png)\)", text)
    assert plots and all((report.parent / p).read_bytes()[:4] == b"\x89PNG" for p in plots)
    assert "slowdown" in text and "gate_mpk_light" in text
