"""Plots and a short Markdown report of a run, from its metrics.jsonl and summary."""
from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

from rayllm.io import write_text_atomic


def read_metrics(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def plot_metrics(records: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per (stage, metric) series with at least two points."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if "event" in r or "step" not in r:  # fault events are a table in the report, not a series
            continue
        for k, v in r.items():
            if k not in ("step", "epoch", "stage") and isinstance(v, (int, float)) and not isinstance(v, bool):
                series[(r.get("stage", "run"), k)].append((r["step"], v))
            elif k.startswith("rank_") and isinstance(v, list):  # per rank (rank_shares): a line per rank
                for i, x in enumerate(v):
                    if isinstance(x, (int, float)):
                        series[(r.get("stage", "run"), f"{k}_{i}")].append((r["step"], x))
    paths = []
    out_dir.mkdir(parents=True, exist_ok=True)
    for (stage, key), pts in sorted(series.items()):
        if len(pts) < 2:
            continue
        fig, ax = plt.subplots(figsize=(5, 3.2))
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker="." if len(pts) < 50 else None)
        ax.set(title=f"{stage}: {key}", xlabel="step", ylabel=key)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        p = out_dir / f"{stage}_{key}.png"
        tmp = p.with_name(f".{p.name}.tmp.png")
        fig.savefig(tmp, dpi=90)
        plt.close(fig)
        tmp.replace(p)
        paths.append(p)
    return paths


_EVENT_COLUMNS = ("stage", "event", "kind", "group", "rank", "call", "step", "detect_s", "recover_s", "world_size_after")


def fault_table(records: list[dict]) -> list[str]:
    """Markdown rows of the run's fault and join events (docs/elasticity.md); [] when none."""
    events = [r for r in records if r.get("event") in ("fault", "join")]
    if not events:
        return []
    cell = lambda v: "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    return (["## Faults and recoveries", "", "| " + " | ".join(_EVENT_COLUMNS) + " |",
             "|" + "---|" * len(_EVENT_COLUMNS)]
            + ["| " + " | ".join(cell(e.get(c)) for c in _EVENT_COLUMNS) + " |" for e in events] + [""])


def write_report(run_dir: Path, summary: dict) -> Path:
    records = read_metrics(run_dir / "metrics.jsonl")
    plots = plot_metrics(records, run_dir / "plots")
    lines = [f"# rayllm run `{summary.get('pipeline', run_dir.name)}`", ""]
    for st in summary.get("stages", []):
        lines.append(f"## {st['stage']}")
        lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in st.items() if k != "stage"]
        lines.append("")
    lines += fault_table(records)
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    return path
