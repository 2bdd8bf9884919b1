"""rayllm's numbers as Ray metrics (`ray.util.metrics`), for the Ray dashboard, Prometheus and
the Grafana dashboard in cluster/grafana/rayllm.json.

Published from the driver, which holds every group's merged step record (the per-rank values,
such as each rank's share of the batch, come back in it), so one process sets each series and
the values are the ones in metrics.jsonl. Ray exports them, prefixed `ray_`, on the node's
metrics port. Every metric has the tags `stage`, `role` and `rank` (`all` for a group-level value).
"""
from __future__ import annotations

import threading

from rayllm.redact import redact

TAGS = ("stage", "role", "rank")
# metric -> (description, extra tag keys); all gauges (RayMetricsSink says why)
METRICS = {
    "rayllm_tokens_per_second": ("tokens trained (SFT) or generated (PPO) per second", ()),
    "rayllm_samples_per_second": ("samples (rows, pairs, rollouts) per second", ()),
    "rayllm_loss": ("a trainable group's loss at the step", ()),
    "rayllm_eval_loss": ("held-out loss", ()),
    "rayllm_accuracy": ("reward model pairwise accuracy on the step's batch", ()),
    "rayllm_eval_accuracy": ("reward model pairwise accuracy on held-out pairs", ()),
    "rayllm_reward": ("mean reward of the iteration's rollouts", ()),
    "rayllm_kl": ("KL to the reference, per sequence", ()),
    "rayllm_entropy": ("policy entropy per token", ()),
    "rayllm_weight_sync_seconds": ("seconds of the weight push to the rollout engines", ()),
    "rayllm_weight_sync_gap": ("largest log-prob gap of the push verification", ()),
    "rayllm_phase_seconds": ("seconds of a PPO iteration's phase", ("phase",)),
    "rayllm_data_records": ("records by outcome of the data preparation", ("status",)),
    "rayllm_group_size": ("ranks (or engines) in the group", ()),
    "rayllm_rank_share": ("a rank's share of the step's tokens", ()),
    "rayllm_step": ("the stage's latest step", ()),
    "rayllm_elastic_events": ("membership events so far: lost, joined, left, recovered", ("kind",)),
}
_EVENT_KIND = {"fault": "lost", "join": "joined", "leave": "left", "recovered": "recovered"}
DATA_STATUSES = ("records_in", "kept", "exact_duplicate", "near_duplicate", "contaminated", "quarantined")
PHASES = ("generate", "experience", "train", "sync")
_STAGE_ROLE = {"sft": "policy", "reward": "reward", "ppo": "policy"}


def points(kind: str, rec: dict) -> list[tuple[str, float, dict]]:
    """(metric, value, tags without `stage`) for one metrics.jsonl step line of a `kind` stage."""
    role = _STAGE_ROLE.get(kind, kind)
    g = lambda k: rec.get(k) if isinstance(rec.get(k), (int, float)) and not isinstance(rec.get(k), bool) else None  # noqa: E731
    out = []

    def put(metric, value, role=role, rank="all", **extra):
        if value is not None:
            out.append((metric, float(value), {"role": role, "rank": str(rank), **extra}))

    put("rayllm_step", g("step"))
    if kind in ("sft", "reward"):
        put("rayllm_loss", g("loss"))
        put("rayllm_eval_loss", g("eval_loss"))
        put("rayllm_accuracy", g("accuracy"))
        put("rayllm_eval_accuracy", g("eval_accuracy"))
        t = g("step_time_s")
        if t:
            put("rayllm_tokens_per_second", g("tokens") / t if g("tokens") is not None else None)
            ids = rec.get("sample_ids")
            n = g("pairs") if kind == "reward" else (len(ids) if isinstance(ids, list) else None)
            put("rayllm_samples_per_second", n / t if n is not None else None)
        put("rayllm_group_size", g("world_size"))
        for i, share in enumerate(rec.get("rank_shares") or []):
            put("rayllm_rank_share", share, rank=i)
    elif kind == "ppo":
        put("rayllm_loss", g("policy_loss"), role="policy")
        put("rayllm_loss", g("value_loss"), role="critic")
        put("rayllm_reward", g("reward"))
        put("rayllm_kl", g("kl"))
        put("rayllm_entropy", g("entropy"))
        put("rayllm_weight_sync_seconds", g("sync_s"), role="rollout")
        put("rayllm_weight_sync_gap", g("sync_max_gap"), role="rollout")
        for ph in PHASES:
            put("rayllm_phase_seconds", g(f"{ph}_s"), phase=ph)
        t, n = g("iteration_s"), g("samples")
        if t and n is not None:
            put("rayllm_samples_per_second", n / t, role="rollout")
            if g("response_length") is not None:
                put("rayllm_tokens_per_second", n * g("response_length") / t, role="rollout")
    for status in DATA_STATUSES:
        put("rayllm_data_records", g(f"data_{status}"), role="data", status=status)
    return out


def event_points(ev: dict) -> list[tuple[str, float, dict]]:
    """Counter increments and group sizes of one fault, join, leave or recovery event."""
    role = str(ev.get("group", "")).rsplit("/", 1)[-1] or "unknown"
    out = []
    if ev.get("event") in _EVENT_KIND:
        out.append(("rayllm_elastic_events", 1.0, {"role": role, "rank": "all", "kind": _EVENT_KIND[ev["event"]]}))
    size = ev.get("world_size_after", ev.get("world_size"))
    if isinstance(size, int):
        out.append(("rayllm_group_size", float(size), {"role": role, "rank": "all"}))
    return out


class RayMetricsSink:
    """Sets the gauges, and sets them again every `refresh_s`: Ray's metrics agent drops a series
    that was not recorded for about 20 s (measured on Ray 2.60), and a stage's last loss should stay
    on the dashboard while the next stage runs. Event counts are gauges of the total so far for
    the same reason (a Counter's increments would be forgotten the same way)."""

    name = "logging.ray_metrics"

    def __init__(self, stage_kinds: dict[str, str], refresh_s: float = 5.0):
        from ray.util import metrics

        self.kinds = stage_kinds
        self.metrics = {name: metrics.Gauge(name, description=desc, tag_keys=TAGS + tuple(extra))
                        for name, (desc, extra) in METRICS.items()}
        self.values: dict[tuple[str, tuple], float] = {}
        self._lock, self._stop = threading.Lock(), threading.Event()
        self._thread = threading.Thread(target=self._refresh, args=(refresh_s,), daemon=True,
                                        name="rayllm-ray-metrics")
        self._thread.start()

    def _emit(self, stage: str, pts) -> None:
        with self._lock:
            for name, value, tags in pts:
                key = (name, tuple(sorted(redact({"stage": stage, **tags}).items())))
                if name == "rayllm_elastic_events":
                    value += self.values.get(key, 0.0)
                self.values[key] = value
                self.metrics[name].set(value, tags=dict(key[1]))

    def _refresh(self, every: float) -> None:
        while not self._stop.wait(every):
            with self._lock:
                for (name, tags), value in self.values.items():
                    self.metrics[name].set(value, tags=dict(tags))

    def resume(self, stage: str, step: int) -> None:
        pass  # gauges hold the latest value; a resumed stage sets them again

    def log(self, stage: str, step: int, rec: dict) -> None:
        self._emit(stage, points(self.kinds.get(stage, stage), rec))

    def event(self, stage: str, ev: dict) -> None:
        self._emit(stage, event_points(ev))

    def close(self) -> None:
        """Stop refreshing; Ray forgets the series about 20 s later."""
        self._stop.set()
        self._thread.join(timeout=10)
