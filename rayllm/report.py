"""Plots, a short Markdown report and a self-contained HTML report of a run (docs/report.md),
from its metrics.jsonl, summary and config. Everything shown passes through rayllm.redact."""
from __future__ import annotations

import base64
import html
import json
import os
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

from rayllm.io import write_text_atomic
from rayllm.redact import redact


def read_metrics(path: Path) -> list[dict]:
    """The metrics.jsonl lines; a line cut by a crash mid-write is skipped."""
    if not path.is_file():
        return []
    out = []
    for line in path.read_text().splitlines():
        if line.strip():
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(rec, dict):
                out.append(rec)
    return out


def metric_series(records: list[dict]) -> dict[tuple[str, str], list[tuple[int, float]]]:
    """(stage, metric) -> [(step, value)] of the step lines (event lines are not series); a line's
    series are the loggers' (rayllm.loggers.scalars), so the report plots what TensorBoard holds."""
    from rayllm.loggers import scalars

    series: dict[tuple[str, str], list[tuple[int, float]]] = defaultdict(list)
    for r in records:
        if "event" in r or "step" not in r:  # fault events are a table in the report, not a series
            continue
        for k, v in scalars(r).items():
            series[(r.get("stage", "run"), k)].append((r["step"], v))
    return series


def plot_metrics(records: list[dict], out_dir: Path) -> list[Path]:
    """One PNG per (stage, metric) series with at least two points, in sorted (stage, metric) order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = metric_series(records)
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


_EVENT_COLUMNS = ("stage", "event", "kind", "group", "rank", "call", "step", "detect_s", "recover_s",
                  "world_size_after")


def fault_table(records: list[dict]) -> list[str]:
    """Markdown rows of the run's fault, join and leave events (docs/elasticity.md); [] when none.
    report.html lists every event with all its fields."""
    events = [r for r in records if r.get("event") in ("fault", "join", "leave")]
    if not events:
        return []
    cell = lambda v: "" if v is None else (f"{v:.3g}" if isinstance(v, float) else str(v))  # noqa: E731
    return (["## Faults and recoveries", "", "| " + " | ".join(_EVENT_COLUMNS) + " |",
             "|" + "---|" * len(_EVENT_COLUMNS)]
            + ["| " + " | ".join(cell(e.get(c)) for c in _EVENT_COLUMNS) + " |" for e in events] + [""])


def write_report(run_dir: Path, summary: dict) -> Path:
    """report.md, plots/ and report.html (write_html_report) of a run; returns report.md's path.
    A failure of the HTML part is reported on stderr, not raised: the run itself is done."""
    return _render(Path(run_dir), summary, strict=False)[0]


def render_report(run_dir: Path, summary: dict | None = None) -> tuple[Path, Path]:
    """`rayllm report RUN_DIR`: report.md, plots/ and report.html from what the directory holds
    (summary.json, or the DONE.json of each finished stage); returns (report.md, report.html)."""
    return _render(Path(run_dir), summary, strict=True)


def _render(run_dir: Path, summary: dict | None, strict: bool) -> tuple[Path, Path | None]:
    records = read_metrics(run_dir / "metrics.jsonl")
    plots = plot_metrics(records, run_dir / "plots")
    unfinished = []
    if summary is None:
        summary, unfinished = load_summary(run_dir)
    shown = redact(summary)
    lines = [f"# rayllm run `{shown.get('pipeline', run_dir.name)}`", ""]
    if unfinished:
        lines += [f"Unfinished stages (no DONE.json): {', '.join(map(str, unfinished))}", ""]
    for st in shown.get("stages", []):
        lines.append(f"## {st.get('stage', '?')}")
        lines += [f"- {k}: {v:.4g}" if isinstance(v, float) else f"- {k}: {v}" for k, v in st.items() if k != "stage"]
        lines.append("")
    lines += fault_table(redact(records))
    lines += ["## Plots", ""] + [f"![{p.stem}](plots/{p.name})" for p in plots]
    path = run_dir / "report.md"
    write_text_atomic(path, "\n".join(lines) + "\n")
    try:
        html_path = _write_html(run_dir, summary, records, plots)
    except Exception as e:  # noqa: BLE001 - after a run the report is extra; `rayllm report RUN_DIR` retries it
        if strict:
            raise
        print(f"[rayllm] report.html not written ({type(e).__name__}: {e}); retry with `rayllm report {run_dir}`",
              file=sys.stderr)
        html_path = None
    return path, html_path


# --- the HTML report --------------------------------------------------------------------------

def load_summary(run_dir: Path) -> tuple[dict, list[str]]:
    """The run's summary and the names of its unfinished stages: summary.json when the run ended;
    otherwise (a run still going, or one that crashed) built from the stages' DONE.json files."""
    run_dir = Path(run_dir)
    config = _read_json(run_dir / "pipeline.json") or {}
    names = [st.get("name") for st in config.get("stages", []) if isinstance(st, dict)]
    summary = _read_json(run_dir / "summary.json")
    if isinstance(summary, dict) and isinstance(summary.get("stages"), list):
        done = {st.get("stage") for st in summary["stages"] if isinstance(st, dict)}
        return summary, [n for n in names if n not in done]
    stages, unfinished = [], []
    for n in names:
        done = _read_json(run_dir / str(n) / "DONE.json")
        if isinstance(done, dict) and isinstance(done.get("summary"), dict):
            stages.append({"stage": n, **done["summary"]})
        else:
            unfinished.append(n)
    return {"pipeline": config.get("name", run_dir.name), "run_dir": str(run_dir), "wall_time_s": None,
            "stages": stages, "partial": True}, unfinished


def write_html_report(run_dir: Path, summary: dict | None = None) -> Path:
    """RUN_DIR/report.html: one self-contained page (plots inline as data: URIs, no external
    assets, no script) with the run's header, each stage's summary, its data-pipeline counts,
    the fault and membership events, every metric series as a plot, and the config. Without
    `summary` it is read from summary.json, or from the DONE.json files of a run that did not end."""
    run_dir = Path(run_dir)
    records = read_metrics(run_dir / "metrics.jsonl")
    return _write_html(run_dir, summary, records, plot_metrics(records, run_dir / "plots"))


_STYLE = """
body{font-family:system-ui,-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:24px;color:#1b1b1b;max-width:1400px}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.6em}
table{border-collapse:collapse;margin:.5em 0 1em;font-size:.9em}
th,td{border:1px solid #d0d0d0;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f3f3f3}td.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{background:#fff4d6;border:1px solid #e0b84c;padding:8px 12px}
.plots{display:flex;flex-wrap:wrap;gap:8px}figure{margin:0}figcaption{font-size:.8em;color:#555}
pre{background:#f7f7f7;padding:8px;overflow:auto;font-size:.85em}.muted{color:#777}.wide{overflow-x:auto}
"""
_DATA_COLUMNS = (("records_in", "records in"), ("kept", "kept"), ("exact_duplicate", "exact dup"),
                 ("near_duplicate", "near dup"), ("contaminated", "contaminated"), ("quarantined", "quarantined"),
                 ("rows", "rows"), ("seq_len", "seq len"), ("padding_share", "padding share"))
_HTML_EVENT_COLUMNS = ("stage", "event", "kind", "group", "rank", "member", "pid", "call", "step", "epoch",
                       "world_size", "world_size_after", "detect_s", "recover_s", "reason", "error")


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _esc(v) -> str:
    return html.escape(str(v), quote=True)


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list, tuple)):
        return json.dumps(v, sort_keys=True, default=str)
    return str(v)


def _cell(v) -> str:
    num = isinstance(v, (int, float)) and not isinstance(v, bool)
    return f'<td class="num">{_esc(_fmt(v))}</td>' if num else f"<td>{_esc(_fmt(v))}</td>"


def _table(head: list[str] | None, rows: list[list]) -> str:
    thead = "" if head is None else "<thead><tr>" + "".join(f"<th>{_esc(h)}</th>" for h in head) + "</tr></thead>"
    return ("<table>" + thead + "<tbody>"
            + "".join("<tr>" + "".join(_cell(v) for v in row) + "</tr>" for row in rows) + "</tbody></table>")


def _prepared_stats(run_dir: Path, max_depth: int = 4) -> list[tuple[str, dict]]:
    """(relative path, stats) of every stats.json of `rayllm data prepare` under the run dir."""
    found = []
    for root, dirs, files in os.walk(run_dir):
        rel = Path(root).relative_to(run_dir)
        dirs[:] = sorted(d for d in dirs if not d.startswith(".") and len(rel.parts) < max_depth
                         and d not in ("checkpoints", "model", "packed", "records", "tensorboard", "logs", "plots"))
        if "stats.json" in files:
            stats = _read_json(Path(root) / "stats.json")
            if isinstance(stats, dict) and "records_in" in stats:
                found.append(((rel / "stats.json").as_posix(), stats))
    return found


def _data_row(label: str, d: dict) -> list:
    counts = [d.get(k) for k, _ in _DATA_COLUMNS]
    parts = [d.get(k) for k in ("kept", "exact_duplicate", "near_duplicate", "contaminated", "quarantined")]
    known = all(isinstance(x, int) for x in [d.get("records_in"), *parts])
    balanced = d.get("records_in") == sum(parts) if known else None
    return [label, *counts, {True: "yes", False: "NO", None: ""}[balanced]]


def _write_html(run_dir: Path, summary: dict | None, records: list[dict], plots: list[Path]) -> Path:
    loaded, unfinished = load_summary(run_dir)
    if summary is None:
        summary = loaded
    else:
        done = {st.get("stage") for st in summary.get("stages", []) if isinstance(st, dict)}
        unfinished = [n for n in unfinished if n not in done]
    config = _read_json(run_dir / "pipeline.json")
    series = {k: pts for k, pts in sorted(metric_series(records).items()) if len(pts) >= 2}  # plot_metrics' order
    summary, config, records = redact(summary), redact(config), redact(records)
    stage_order = [st.get("name") for st in (config or {}).get("stages", []) if isinstance(st, dict)]
    summaries = {st.get("stage"): st for st in summary.get("stages", []) if isinstance(st, dict)}
    for name in [*summaries, *(r.get("stage", "run") for r in records)]:  # "run": as metric_series names it
        if name is not None and name not in stage_order:
            stage_order.append(name)

    name = summary.get("pipeline") or (config or {}).get("name") or run_dir.name
    wall = summary.get("wall_time_s")
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
           '<meta name="viewport" content="width=device-width, initial-scale=1">',
           f"<title>rayllm run {_esc(name)}</title><style>{_STYLE}</style></head><body>",
           f"<h1>rayllm run <code>{_esc(name)}</code></h1>"]
    status = "finished" if not unfinished and not summary.get("partial") else "not finished"
    out.append(_table(None, [
        ["pipeline", name], ["run dir", redact(str(run_dir.resolve()))],
        ["wall time", f"{wall:.1f} s" if isinstance(wall, (int, float)) else "unknown (no summary.json)"],
        ["status", status], ["stages", ", ".join(str(s) for s in stage_order)],
        ["report written", time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())]]))
    if summary.get("partial"):
        out.append('<p class="warn">No summary.json: the run is still going or stopped before its end. '
                   "This report is built from the DONE.json of each finished stage.</p>")
    if unfinished:
        out.append('<p class="warn">Unfinished stages (no DONE.json): '
                   + ", ".join(f"<b>{_esc(n)}</b>" for n in unfinished) + "</p>")

    out.append('<h2 id="stages">Stages</h2>')
    for stage in stage_order:
        st = summaries.get(stage)
        out.append(f'<h3 id="stage-{_esc(stage)}">{_esc(stage)}</h3>')
        if st is None:
            out.append('<p class="muted">unfinished: no summary</p>')
            continue
        rows = [[k, v] for k, v in st.items() if k != "stage" and (v is None or isinstance(v, (str, int, float, bool)))]
        rest = [k for k, v in st.items() if k != "stage" and isinstance(v, (dict, list))]
        rows += [[k, _fmt(st[k]) if len(_fmt(st[k])) <= 300 else f"({type(st[k]).__name__} of {len(st[k])})"]
                 for k in rest]
        out.append(_table(["field", "value"], rows))

    data_rows = [_data_row(stage, summaries[stage]) for stage in stage_order
                 if stage in summaries and "records_in" in summaries[stage]]
    prepared = [_data_row(rel, redact(stats)) for rel, stats in _prepared_stats(run_dir)]
    out.append('<h2 id="data">Data pipeline</h2>')
    head = [c for _, c in _DATA_COLUMNS] + ["balanced"]
    if data_rows:
        out.append("<p>Per stage (its summary):</p>" + _table(["stage", *head], data_rows))
    if prepared:
        out.append("<p>Prepared data (<code>stats.json</code> of <code>rayllm data prepare</code>):</p>"
                   + _table(["stats.json", *head], prepared))
    if not data_rows and not prepared:
        out.append('<p class="muted">No stage reported data-pipeline counts.</p>')

    events = [r for r in records if "event" in r]
    out.append('<h2 id="events">Faults and membership events</h2>')
    if events:
        kinds = Counter(str(e["event"]) + (f" ({e['kind']})" if e.get("kind") else "") for e in events)
        out.append("<p>" + ", ".join(f"{_esc(k)}: {n}" for k, n in sorted(kinds.items())) + "</p>")
        cols = [c for c in _HTML_EVENT_COLUMNS if any(c in e for e in events)]
        cols += [c for c in dict.fromkeys(k for e in events for k in e) if c not in cols]
        out.append('<div class="wide">' + _table(cols, [[e.get(c) for c in cols] for e in events]) + "</div>")
    else:
        out.append('<p class="muted">No faults, joins or leaves.</p>')

    by_stage: dict[str, list[tuple[str, list, Path]]] = defaultdict(list)
    for ((stage, key), pts), p in zip(series.items(), plots):
        by_stage[stage].append((key, pts, p))
    out.append(f'<h2 id="plots">Metrics ({len(plots)} series)</h2>')
    if not plots:
        out.append('<p class="muted">No metric series with two or more points.</p>')
    for stage in [s for s in stage_order if s in by_stage] + [s for s in by_stage if s not in stage_order]:
        out.append(f"<h3>{_esc(stage)}</h3><div class=\"plots\">")
        for key, pts, p in by_stage[stage]:
            data = base64.b64encode(p.read_bytes()).decode("ascii")
            out.append(f'<figure><img src="data:image/png;base64,{data}" alt="{_esc(stage)}: {_esc(key)}" '
                       f'width="450" height="288" data-series="{_esc(stage)}/{_esc(key)}"><figcaption>{_esc(key)}: '
                       f"{len(pts)} points, steps {pts[0][0]}-{pts[-1][0]}, last {_esc(_fmt(pts[-1][1]))}"
                       "</figcaption></figure>")
        out.append("</div>")

    out.append('<h2 id="config">Config</h2>')
    if config is None:
        out.append('<p class="muted">No pipeline.json.</p>')
    else:
        out.append("<details><summary>pipeline.json (secrets redacted)</summary><pre>"
                   + _esc(json.dumps(config, indent=2, sort_keys=False)) + "</pre></details>")
    out.append("</body></html>")
    path = run_dir / "report.html"
    write_text_atomic(path, "\n".join(out) + "\n")
    return path
