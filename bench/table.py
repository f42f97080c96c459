"""The benchmark table: rows of (measured, baseline, ratio, goal, pass/miss) and their layout.

Every number in the table is measured by the command that prints it, against a baseline measured in
the same run (the machines this runs on are shared VMs: an absolute number from another run says
little). A row's goal comes from issue 6 and is checked against the ratio or the number itself.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Callable, Iterable

_OPS = {"<=": operator.le, "<": operator.lt, ">=": operator.ge, ">": operator.gt}


@dataclass(frozen=True)
class Goal:
    """A target from the issue: `on` is "ratio" or "value" (the row's number, in its unit), or
    "share" (the VMM's share of wall time, 1 - baseline/value, in percent)."""

    op: str
    limit: float
    on: str = "ratio"
    unit: str = "x"

    def text(self) -> str:
        if self.on == "ratio":
            return f"{self.op}{self.limit:g}x"
        if self.on == "share":
            return f"VMM {self.op}{self.limit:g}%"
        return f"{self.op}{self.limit:g} {self.unit}"

    def check(self, row: "Row") -> bool | None:
        x = {"ratio": row.ratio, "value": row.value, "share": row.share}[self.on]
        return None if x is None else _OPS[self.op](x, self.limit)


@dataclass
class Row:
    """One line of the table. `value` and `baseline` are numbers in `unit`; `ratio` is value /
    baseline unless given. A row with no value (not measured) says why in `note`."""

    name: str
    value: float | None = None
    unit: str = ""
    baseline: float | None = None
    baseline_name: str = ""
    goal: Goal | None = None
    note: str = ""
    ratio: float | None = None
    details: list[str] = field(default_factory=list)   # extra lines printed under the row

    def __post_init__(self):
        if self.ratio is None and self.value is not None and self.baseline:
            self.ratio = self.value / self.baseline

    @property
    def share(self) -> float | None:
        """For a wall-time row against time in KVM_RUN: the percentage spent outside it."""
        if self.value is None or not self.baseline:
            return None
        return (1 - self.baseline / self.value) * 100

    @property
    def mark(self) -> str:
        if self.goal is None:
            return ""
        ok = self.goal.check(self)
        return "" if ok is None else ("pass" if ok else "MISS")


@dataclass
class Section:
    title: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)    # lines printed under the section


def fmt_number(x: float | None, unit: str = "") -> str:
    if x is None:
        return "-"
    if unit in ("MB/s", "MiB/s"):
        s = f"{x:.0f}"
    elif unit == "us":
        s = f"{x:.2f}"
    elif unit == "%":
        s = f"{x:.1f}"
    elif abs(x) >= 100:
        s = f"{x:.0f}"
    elif abs(x) >= 10:
        s = f"{x:.1f}"
    else:
        s = f"{x:.2f}"
    return f"{s} {unit}".strip()


_COLS = (("", 40), ("measured", 12), ("baseline", 26), ("ratio", 7), ("goal", 10), ("", 5))


def format_table(title: str, header: Iterable[str], sections: Iterable[Section],
                 footer: Iterable[str] = ()) -> str:
    """The whole table as text: a title, header lines, then each section's rows."""
    width = sum(w for _, w in _COLS) + len(_COLS) - 1
    out = [title, *header, "=" * width]
    out.append(" ".join(f"{h:<{w}}" if i == 0 else f"{h:>{w}}" if i < 4 else f"{h:<{w}}"
                        for i, (h, w) in enumerate(_COLS)).rstrip() + "  note")
    for sec in sections:
        out.append("-" * width)
        out.append(sec.title)
        for r in sec.rows:
            base = (f"{r.baseline_name} {fmt_number(r.baseline, r.unit)}".strip()
                    if r.baseline is not None else r.baseline_name)
            ratio = f"{r.ratio:.2f}x" if r.ratio is not None else "-"
            cells = [f"  {r.name}"[:40].ljust(40), f"{fmt_number(r.value, r.unit):>12}",
                     f"{base[:26]:>26}", f"{ratio:>7}",
                     f"{r.goal.text() if r.goal else '':<10}", f"{r.mark:<5}"]
            out.append((" ".join(cells) + ("  " + r.note if r.note else "")).rstrip())
            out.extend(f"      {d}" for d in r.details)
        out.extend(f"  {n}" for n in sec.notes)
    out.append("=" * width)
    out.extend(footer)
    return "\n".join(out)


def failed_section(title: str, exc: BaseException) -> Section:
    """A section whose benchmark raised: one row that says so (one broken benchmark must not sink
    the table)."""
    return Section(title, [Row("not measured", note=f"failed: {type(exc).__name__}: {exc}")])


Runner = Callable[[bool], Section]
