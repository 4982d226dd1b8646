"""Result tables for eval summaries."""

from __future__ import annotations

from rich.table import Table


def _pct(v) -> str:
    return "-" if v is None else f"{100 * v:.1f}"


def summary_table(summaries: list[dict], title: str | None = None) -> Table:
    t = Table(title=title or (f"eval: {summaries[0].get('model', '')}" if summaries else "eval"))
    # short headers: the table must fit an 80-column terminal
    for col in ("bench", "split", "n", "acc%", "±95", "avg@k", "fail%", "turns", "crops", "hit%", "tok", "/s"):
        t.add_column(col, justify="left" if col in ("bench", "split") else "right")
    for s in summaries:
        t.add_row(s["bench"], "all", str(s["n"]), _pct(s["accuracy"]), _pct(s["ci95"]), _pct(s["avg_at_k"]),
                  _pct(s["parse_failure_rate"]), f"{s['mean_turns']:.2f}", f"{s['mean_crops']:.2f}",
                  _pct(s.get("crop_hit_rate")), f"{s['tokens_per_sample']:.0f}",
                  "-" if s.get("samples_per_second") is None else f"{s['samples_per_second']:.2f}")
        splits = s.get("splits") or {}
        for name, sp in (splits.items() if len(splits) > 1 else ()):
            t.add_row("", name, str(sp["n"]), _pct(sp["accuracy"]), _pct(sp["ci95"]), _pct(sp["avg_at_k"]),
                      _pct(sp["parse_failure_rate"]), f"{sp['mean_turns']:.2f}", f"{sp['mean_crops']:.2f}",
                      _pct(sp.get("crop_hit_rate")), f"{sp['tokens_per_sample']:.0f}", "")
    return t
