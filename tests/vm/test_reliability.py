"""`harness bench reliability`, short: four faults injected and survived,
a soak across three VMs with every page and file checked, nothing lost."""

import json
import os
import subprocess
import sys


def test_reliability_report_says_nothing_was_lost(tmp_path):
    r = subprocess.run([sys.executable, "-m", "harness.cli", "bench", "reliability",
                        "--duration", "15", "--json"], capture_output=True, text=True,
                       timeout=600, env={**os.environ,
                                         "HARNESS_RUN_DIR": str(tmp_path)})
    assert r.returncode == 0, r.stderr
    rows = {row["metric"]: row["p50"] for row in json.loads(r.stdout)["rows"]}
    assert rows["data_lost"] == 0
    assert rows["faults_survived"] == rows["faults_injected"] == 4
    assert rows["pages_checked"] > 4096 and rows["rows_checked"] > 50
    assert rows["soak_tasks_done"] >= 1
    assert {"mem_growth:pnode0:host", "mem_growth:snode0:agent",
            "mem_growth:pnode0:guest_used", "mem_growth:pnode0:workload"} <= set(rows)
