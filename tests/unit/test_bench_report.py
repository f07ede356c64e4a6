"""Benchmark reports: JSON there and back, and the table people read."""

import json

from harness.bench.report import Report, Row


def _report() -> Report:
    return Report("gates", placement="vm", accel="tcg",
                  rows=[Row.of("gate_none", "cycles", [10, 12, 11], "function_call", [5, 6]),
                        Row("dispatch", "tasks/s", 1234.5, 99999.0, 3)],
                  notes=["in a guest"])


def test_from_json_inverts_to_json():
    rep = _report()
    back = Report.from_json(json.loads(rep.to_json()))
    assert back == Report(rep.bench, rep.placement, rep.accel, rep.rows)  # to_json has no notes
    assert back.to_json() == rep.to_json()


def test_from_json_keeps_notes_a_guest_adds():
    rep = _report()
    assert Report.from_json({**json.loads(rep.to_json()), "notes": rep.notes}) == rep


def test_table_right_aligns_the_numbers():
    assert _report().table().splitlines() == [
        "gates (vm, tcg)",
        "metric     unit       p50     p99  n          floor  floor p50  ratio",
        "---------  -------  -----  ------  -  -------------  ---------  -----",
        "gate_none  cycles      11      12  3  function_call          5   2.20",
        "dispatch   tasks/s  1,234  99,999  3              -          -      -",
        "in a guest"]
