"""Plain-text tables for the console (results end in a readable table)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["text_table"]


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], footer: Sequence[Sequence[str]] = ()) -> str:
    """Columns padded to their widest cell; rules above and below the header, before the footer, at the end."""
    all_rows = [list(header), *map(list, rows), *map(list, footer)]
    widths = [max(len(r[c]) for r in all_rows) for c in range(len(header))]
    rule = "+".join("-" * (w + 2) for w in widths)

    def line(row: Sequence[str]) -> str:
        return "|".join(f" {v:<{w}} " for v, w in zip(row, widths))

    out = [rule, line(header), rule, *(line(r) for r in rows)]
    if footer:
        out += [rule, *(line(r) for r in footer)]
    return "\n".join([*out, rule])
