"""Result tables for eval summaries."""

from __future__ import annotations

from rich.table import Table


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def summary_table(summaries: list[dict], title: str | None = None) -> Table:
    """One row per benchmark (and per sub-split). An ``err%`` column (share of draws whose engine call failed,
    ``engine_error_rate``) is added when any benchmark has engine failures, e.g. an endpoint that was down."""
    t = Table(title=title or (f"eval: {summaries[0].get('model', '')}" if summaries else "eval"))
    errors = any(s.get("engine_error_rate") for s in summaries)
    # short headers: the table must fit an 80-column terminal
    cols = ["bench", "split", "n", "acc%", "±95", "avg@k", "fail%", "turns", "crops", "hit%", "tok", "/s"]
    if errors:
        cols.insert(7, "err%")
    for col in cols:
        t.add_column(col, justify="left" if col in ("bench", "split") else "right")

    def row(bench: str, split: str, s: dict, speed: str) -> list[str]:
        cells = [bench, split, str(s["n"]), _pct(s["accuracy"]), _pct(s["ci95"]), _pct(s["avg_at_k"]),
                 _pct(s["parse_failure_rate"]), f"{s['mean_turns']:.2f}", f"{s['mean_crops']:.2f}",
                 _pct(s.get("crop_hit_rate")), f"{s['tokens_per_sample']:.0f}", speed]
        if errors:
            cells.insert(7, _pct(s.get("engine_error_rate", 0.0)))
        return cells

    for s in summaries:
        t.add_row(*row(s["bench"], "all", s,
                       "-" if s.get("samples_per_second") is None else f"{s['samples_per_second']:.2f}"))
        splits = s.get("splits") or {}
        for name, sp in (splits.items() if len(splits) > 1 else ()):
            t.add_row(*row("", name, sp, ""))
    return t
