"""Benchmark results: rows of median, p99, floor and ratio, printed as a
table for people or as the JSON object DESIGN.md fixes for scripts."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

from harness.text import table


def percentile(samples: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of a non-empty sample."""
    if not samples:
        raise ValueError("percentile of no samples")
    s = sorted(samples)
    k = max(0, min(len(s) - 1, math.ceil(q / 100 * len(s)) - 1))
    return float(s[k])


@dataclass
class Row:
    metric: str
    unit: str
    p50: float
    p99: float
    n: int
    floor: str | None = None
    floor_p50: float | None = None
    ratio: float | None = None

    @classmethod
    def of(cls, metric: str, unit: str, samples: Sequence[float],
           floor: str | None = None, floor_samples: Sequence[float] | None = None) -> Row:
        p50 = percentile(samples, 50)
        fp50 = percentile(floor_samples, 50) if floor_samples else None
        return cls(metric, unit, p50, percentile(samples, 99), len(samples), floor, fp50,
                   p50 / fp50 if fp50 else None)


@dataclass
class Report:
    bench: str
    placement: str = "process"
    accel: str | None = None
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_json(self) -> str:
        return json.dumps({"bench": self.bench, "placement": self.placement,
                           "accel": self.accel, "rows": [asdict(r) for r in self.rows]})

    @classmethod
    def from_json(cls, raw: Mapping) -> Report:
        """The report to_json printed, parsed; with its notes if the object
        carries them (a guest's benchmark adds them beside the contract's keys)."""
        return cls(raw["bench"], raw["placement"], raw["accel"],
                   [Row(**r) for r in raw["rows"]], list(raw.get("notes", [])))

    def table(self) -> str:
        head = ["metric", "unit", "p50", "p99", "n", "floor", "floor p50", "ratio"]
        body = [[r.metric, r.unit, _num(r.p50), _num(r.p99), str(r.n), r.floor or "-",
                 _num(r.floor_p50), f"{r.ratio:.2f}" if r.ratio is not None else "-"]
                for r in self.rows]
        title = f"{self.bench} ({self.placement}" + (f", {self.accel}" if self.accel else "") + ")"
        return "\n".join([title, table(head, body, align="llrrrrrr"), *self.notes])


def _num(v: float | None) -> str:
    if v is None:
        return "-"
    if v >= 100:
        return f"{v:,.0f}"
    return f"{v:.3g}"
