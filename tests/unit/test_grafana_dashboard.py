"""cluster/grafana/rayllm.json shows every Ray metric rayllm publishes, and only those."""
import json
import re
from pathlib import Path

from rayllm.ray_metrics import METRICS

DASHBOARD = Path(__file__).resolve().parents[2] / "cluster" / "grafana" / "rayllm.json"


def test_the_grafana_dashboard_plots_every_published_metric_and_no_unknown_one():
    dash = json.loads(DASHBOARD.read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    used = {m for e in exprs for m in re.findall(r"\bray_(rayllm_\w+)\{", e)}
    assert used == set(METRICS)
    assert all('stage=~"$stage"' in e for e in exprs)  # the stage picker applies to every panel
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])
