"""`rayllm report RUN_DIR` on a checked-in run (tests/data/report_run, trimmed from a real
rlhf_tiny run; README.md there says how), then the page in headless Chromium: every plot loads
and is drawn (docs/report.md)."""
import base64
import html
import io
import json
import re
import shutil
import subprocess
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path

import pytest

from rayllm.cli import main

FIXTURE = Path(__file__).parents[1] / "data" / "report_run"
# Secrets planted in the fixture: a W&B-like key in logging.wandb.entity, a password in the
# MLflow URI (pipeline.json), and an env var's value in a fault event's error (metrics.jsonl).
WANDB_LIKE = "0f3c9a5b7d1e2f4a6b8c0d2e4f6a8b0c1d3e5f70"
URL_PASSWORD = "Pa55w0rd-report-test"
ENV_SECRET = "plain-secret-value-17"
SECRETS = (WANDB_LIKE, URL_PASSWORD, ENV_SECRET)
CHROMIUMS = ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable", "chrome")


def _lines(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _series_with_two_points(records: list[dict]) -> set[tuple[str, str]]:
    """The metric series a report must plot, counted here independently of rayllm.report."""
    n: dict[tuple[str, str], int] = {}
    for r in records:
        if "event" in r or "step" not in r:
            continue
        for k, v in r.items():
            if k in ("step", "epoch", "stage"):
                continue
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                n[(r["stage"], k)] = n.get((r["stage"], k), 0) + 1
            elif k.startswith("rank_") and isinstance(v, list):
                for i in range(len(v)):
                    n[(r["stage"], f"{k}_{i}")] = n.get((r["stage"], f"{k}_{i}"), 0) + 1
    return {k for k, c in n.items() if c >= 2}


def _report(run_dir: Path, env: dict) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        with redirect_stdout(out), redirect_stderr(err):
            rc = main(["report", str(run_dir)])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "run"
    shutil.copytree(FIXTURE, run)
    rc, out, err = _report(run, {"WANDB_API_KEY": WANDB_LIKE, "HF_TOKEN": ENV_SECRET})
    assert rc == 0, err
    return run, out, (run / "report.html").read_text()


def _section(page: str, start: str, end: str | None) -> str:
    i = page.index(f'<h2 id="{start}">')
    return page[i:page.index(f'<h2 id="{end}">', i)] if end else page[i:]


def _tables(part: str) -> list[list[dict]]:
    """Our own markup's tables as rows of {header: unescaped cell text}."""
    out = []
    for t in re.findall(r"<table>(.*?)</table>", part, re.S):
        head = [html.unescape(h) for h in re.findall(r"<th>(.*?)</th>", t)]
        rows = [[html.unescape(c) for c in re.findall(r"<td[^>]*>(.*?)</td>", tr)]
                for tr in re.findall(r"<tr>(.*?)</tr>", t.split("</thead>")[-1])]
        out.append([dict(zip(head, r)) for r in rows])
    return out


def _shown(v) -> str:
    return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)


def test_the_cli_writes_a_self_contained_report_and_prints_its_path(rendered):
    run, out, page = rendered
    assert out.strip() == str(run / "report.html")
    assert (run / "report.md").is_file() and (run / "plots" / "ppo_reward.png").is_file()
    assert page.startswith("<!DOCTYPE html>") and page.rstrip().endswith("</html>")
    # Nothing is fetched: no scripts, stylesheets or remote images; every image is a data: URI.
    assert not re.search(r"<script|<link|<iframe|url\(|src=\"(?!data:image/png;base64,)", page)
    for src in re.findall(r'<img src="data:image/png;base64,([^"]+)"', page):
        assert base64.b64decode(src)[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((FIXTURE / "summary.json").read_text())
    assert "rlhf_tiny" in page and str(run.resolve()) in page and f"{summary['wall_time_s']:.1f} s" in page
    assert "Unfinished stages" not in page


def test_each_stage_summary_is_a_table_of_its_fields(rendered):
    _, _, page = rendered
    part = _section(page, "stages", "data")
    summary = json.loads((FIXTURE / "summary.json").read_text())
    for st in summary["stages"]:
        sec = part.split(f'<h3 id="stage-{st["stage"]}">', 1)[1].split("<h3", 1)[0]
        (rows,) = _tables(sec)
        shown = {r["field"]: r["value"] for r in rows}
        assert set(shown) == set(st) - {"stage"}, st["stage"]
        for k, v in st.items():
            if k != "stage" and not isinstance(v, (list, dict)):
                assert shown[k] == _shown(v), (st["stage"], k)
    ppo = {r["field"]: r["value"] for r in _tables(part.split('<h3 id="stage-ppo">')[1])[0]}
    assert json.loads(ppo["examples_final"])[0] == {"prompt": "Sort: 8 5 1 2", "response": "0 5 6 7"}


def test_every_series_with_two_points_is_one_embedded_plot_grouped_by_stage(rendered):
    _, _, page = rendered
    want = _series_with_two_points(_lines(FIXTURE))
    got = re.findall(r'<img [^>]*data-series="([^"]+)"', page)
    assert len(got) == len(re.findall(r"<img ", page)) == len(want) == 21
    assert {tuple(html.unescape(s).split("/", 1)) for s in got} == want
    plots = _section(page, "plots", "config")
    # grouped by stage, in the pipeline's order
    assert plots.index("<h3>sft</h3>") < plots.index("<h3>reward</h3>") < plots.index("<h3>ppo</h3>")
    assert ("ppo", "policy_loss") not in want and "ppo/policy_loss" not in page  # one point: no plot


def test_every_fault_and_membership_event_is_a_row(rendered):
    _, _, page = rendered
    events = [r for r in _lines(FIXTURE) if "event" in r]
    assert {e["event"] for e in events} >= {"fault", "recovered", "join", "leave"}
    (rows,) = _tables(_section(page, "events", "plots"))
    assert len(rows) == len(events) == 8
    for row, e in zip(rows, events):
        for k in ("stage", "event", "kind", "group", "rank", "step", "reason", "world_size_after", "members"):
            if k in e:
                assert row[k] == (json.dumps(e[k]) if isinstance(e[k], list) else _shown(e[k])), (k, e)
    assert "fault (death): 1" in page and "fault (hang): 1" in page and "leave: 2" in page and "join: 1" in page


def test_the_data_pipeline_counts_of_the_stage_and_of_its_prepared_data(rendered):
    _, _, page = rendered
    per_stage, prepared = _tables(_section(page, "data", "events"))
    stats = json.loads((FIXTURE / "sft" / "data" / "stats.json").read_text())
    for row, label in ((per_stage, "sft"), (prepared, "sft/data/stats.json")):
        (r,) = row
        assert r.get("stage", r.get("stats.json")) == label
        assert [r[c] for c in ("records in", "kept", "exact dup", "near dup", "contaminated", "quarantined", "rows")] \
            == [str(stats[k]) for k in ("records_in", "kept", "exact_duplicate", "near_duplicate", "contaminated",
                                        "quarantined", "rows")]
        assert r["padding share"] == f"{stats['padding_share']:.4g}" and r["balanced"] == "yes"


def test_no_secret_reaches_the_report(rendered):
    run, _, page = rendered
    planted = (FIXTURE / "pipeline.json").read_text() + (FIXTURE / "metrics.jsonl").read_text()
    assert all(s in planted for s in SECRETS)  # the fixture does hold them
    for text in (page, (run / "report.md").read_text()):
        for s in SECRETS:
            assert s not in text
    assert "https://ci-bot:***@mlflow.example.com" in page and "refused for ***" in page


def test_a_run_without_summary_json_is_reported_from_its_done_files(tmp_path):
    run = tmp_path / "run"
    shutil.copytree(FIXTURE, run)
    (run / "summary.json").unlink()
    (run / "ppo" / "DONE.json").unlink()  # ppo was running when it stopped
    with open(run / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"stage": "ppo", "event": "fault", "kind": "raise", "group": "ppo/<b>policy</b>",
                            "error": "<img src=x onerror=alert(1)>"}) + "\n")
        f.write('{"stage": "ppo", "step": 3, "rew')  # a line cut by the crash
    rc, out, err = _report(run, {})
    assert rc == 0, err
    page = (run / "report.html").read_text()
    assert "Unfinished stages (no DONE.json): <b>ppo</b>" in page and "No summary.json" in page
    stages = _section(page, "stages", "data")
    assert '<h3 id="stage-sft">' in stages and '<h3 id="stage-reward">' in stages
    assert "unfinished: no summary" in stages.split('<h3 id="stage-ppo">')[1]
    assert "<img src=x" not in page and "&lt;img src=x onerror=alert(1)&gt;" in page
    assert "ppo/&lt;b&gt;policy&lt;/b&gt;" in page
    assert "Unfinished stages (no DONE.json): ppo" in (run / "report.md").read_text()


def test_the_cli_refuses_what_is_not_a_run_directory(tmp_path):
    rc, _, err = _report(tmp_path / "nope", {})
    assert rc == 2 and str(tmp_path / "nope") in err and "no such directory" in err
    rc, _, err = _report(tmp_path, {})
    assert rc == 2 and str(tmp_path) in err and "neither metrics.jsonl nor pipeline.json" in err


_PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images], b = document.body;
  b.dataset.imgs = imgs.length;
  b.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  b.dataset.rects = JSON.stringify(imgs.map(i => { const r = i.getBoundingClientRect();
    return [Math.round(r.left + scrollX), Math.round(r.top + scrollY), i.naturalWidth, i.naturalHeight]; }));
  b.dataset.height = document.documentElement.scrollHeight;
});
</script></body>"""


def _chromium(binary: str, profile: Path, *args: str) -> str:
    cmd = [binary, "--headless", "--disable-gpu", "--no-sandbox", "--hide-scrollbars", "--mute-audio",
           "--no-first-run", "--force-device-scale-factor=1", f"--user-data-dir={profile}", *args]
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    return res.stdout


def test_the_page_renders_in_headless_chromium_with_every_plot_loaded_and_drawn(rendered, tmp_path):
    binary = next((b for b in CHROMIUMS if shutil.which(b)), None)
    if binary is None:
        pytest.skip(f"no Chromium binary on PATH (tried {', '.join(CHROMIUMS)}); scripts/setup.sh installs "
                    "Debian's chromium where apt-get runs as root or with passwordless sudo")
    import matplotlib.image as mpimg
    import numpy as np

    run, _, page = rendered
    # A copy of the page with a probe script (the report itself has none): the images' load state
    # and positions land in data attributes of <body>, which --dump-dom prints.
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _PROBE, 1))
    width = 1200
    dom = _chromium(binary, tmp_path / "profile", f"--window-size={width},1000", "--virtual-time-budget=10000",
                    "--dump-dom", probe.as_uri())
    attrs = {k: html.unescape(v) for k, v in re.findall(r'data-(imgs|loaded|rects|height)="([^"]*)"', dom)}
    n = len(_series_with_two_points(_lines(FIXTURE)))
    assert int(attrs["imgs"]) == n and int(attrs["loaded"]) == n, attrs.get("loaded")
    rects = json.loads(attrs["rects"])
    assert all(w == 450 and h == 288 for _, _, w, h in rects)  # each decoded: its natural size

    height = min(int(attrs["height"]), 16000)
    shot = tmp_path / "shot.png"
    _chromium(binary, tmp_path / "profile", f"--window-size={width},{height}", "--virtual-time-budget=10000",
              f"--screenshot={shot}", (run / "report.html").as_uri())
    img = mpimg.imread(shot)[..., :3]
    assert img.shape[:2] == (height, width)
    assert img.std() > 0.05 and (img < 0.9).mean() > 0.01  # not a blank page
    originals = re.findall(r'<img src="data:image/png;base64,([^"]+)"', page)
    drawn = 0
    for (x, y, w, h), src in zip(rects, originals):
        if y + h > height:
            continue
        region = img[y:y + h, x:x + w]
        assert region.std() > 0.05 and (region < 0.9).mean() > 0.01, (x, y)  # a plot, not white
        want = mpimg.imread(io.BytesIO(base64.b64decode(src)), format="png")[..., :3]
        assert np.abs(region - want).mean() < 0.01, (x, y)  # and the very plot it embeds, where it is (0.0 here)
        drawn += 1
    assert drawn == n, (drawn, height)
