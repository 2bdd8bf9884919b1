"""`rayllm run <pipeline.py|pipeline.yaml> [--set key=value ...]`"""
from __future__ import annotations

import argparse
import sys

from rayllm.pipeline_file import ConfigError, load_pipeline


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="rayllm", description=__doc__)
    sub = ap.add_subparsers(dest="cmd", required=True)
    run = sub.add_parser("run", help="run a pipeline on a local or existing Ray cluster")
    run.add_argument("pipeline", help="a pipelines/*.py file defining PIPELINE, or a YAML file")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. sft.group.zero_stage=3 (repeatable)")
    run.add_argument("--no-progress", action="store_true")
    run.add_argument("--verbose", action="store_true",
                     help="show Ray's, the workers' and the libraries' output here, not only in RUN_DIR/logs/run.log")
    show = sub.add_parser("config", help="print the validated config of a pipeline as YAML")
    show.add_argument("pipeline")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    data = sub.add_parser("data", help="corpus preparation")
    dsub = data.add_subparsers(dest="data_cmd", required=True)
    prep = dsub.add_parser("prepare", help="clean, deduplicate, decontaminate, tokenize and pack a corpus")
    prep.add_argument("config", help="a YAML file of DataPrepConfig fields")
    prep.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    prep.add_argument("--no-progress", action="store_true")
    rep = sub.add_parser("report", help="write RUN_DIR/report.html (and report.md, plots/) from a run directory")
    rep.add_argument("run_dir", help="a run directory: runs/<name>, or the pipeline's run_dir")
    srv = sub.add_parser("serve", help="serve a model over HTTP on Ray Serve (OpenAI-compatible, or reward scores)")
    srv.add_argument("model_dir", nargs="?", help="a Hugging Face model directory (a stage's model/)")
    srv.add_argument("--reward", action="store_true", help="serve a reward model's scores at POST /score")
    srv.add_argument("--reward-fn", help="serve a rule-based verifier (module:function) at POST /score")
    srv.add_argument("--name", default=None, help="the model id clients ask for (default: the directory name)")
    srv.add_argument("--host", default="127.0.0.1", help="listen address (default 127.0.0.1: this machine only)")
    srv.add_argument("--port", type=int, default=8000)
    srv.add_argument("--replicas", type=int, default=1)
    srv.add_argument("--num-cpus", type=float, default=1.0, help="CPUs per replica")
    srv.add_argument("--num-gpus", type=int, default=0, help="GPUs per policy replica (vLLM tensor parallel)")
    srv.add_argument("--address", default=None, help="an existing Ray cluster (default: start a local one)")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        return _serve(args)
    if args.cmd == "report":
        return _report(args.run_dir)
    if args.cmd == "data":
        return _data_prepare(args)
    try:
        pipe = load_pipeline(args.pipeline, args.overrides)
    except ConfigError as e:
        print(f"rayllm: {e}", file=sys.stderr)
        return 2
    if args.cmd == "config":
        import yaml

        print(yaml.safe_dump(pipe.model_dump(mode="json"), sort_keys=False))
        return 0
    from rayllm.console import quiet
    from rayllm.runner import run_pipeline

    with quiet(pipe.out_dir / "logs" / "run.log", verbose=args.verbose or pipe.logging.verbose):
        try:
            run_pipeline(pipe, progress=not args.no_progress)
        finally:
            import ray

            # Inside the quiet block: Ray prints workers' lines on the driver's stdout until it disconnects.
            ray.shutdown()
    return 0


def _data_prepare(args) -> int:
    import json

    from rayllm.pipeline_file import load_data_config

    try:
        cfg = load_data_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"rayllm: {e}", file=sys.stderr)
        return 2
    from rayllm.data.prepare import SourceError, prepare
    from rayllm.runner import start_ray

    try:
        from rayllm.data.prepare import list_sources

        list_sources(cfg.sources)  # fail on a missing source before Ray starts
        start_ray(cfg.ray)
        stats = prepare(cfg, progress=not args.no_progress)
    except SourceError as e:
        print(f"rayllm: {e}", file=sys.stderr)
        return 2
    brief = {k: v for k, v in stats.items() if k != "doc_length_histogram"}
    print(json.dumps(brief, indent=2))
    print(f"[rayllm data] wrote {cfg.output}/packed, removed.jsonl, stats.json, lengths.png")
    return 0


def _report(run_dir: str) -> int:
    """`rayllm report RUN_DIR`: also for a run still going or one that crashed (docs/report.md)."""
    from pathlib import Path

    path = Path(run_dir)
    if not path.is_dir():
        print(f"rayllm: report: {path}: no such directory", file=sys.stderr)
        return 2
    if not (path / "metrics.jsonl").is_file() and not (path / "pipeline.json").is_file():
        print(f"rayllm: report: {path} is not a run directory (it has neither metrics.jsonl nor pipeline.json)",
              file=sys.stderr)
        return 2
    from rayllm.report import render_report

    print(render_report(path)[1])
    return 0


def _serve(args) -> int:
    import time
    from pathlib import Path

    from rayllm.serve import check_model_dir, policy_app, reward_app, start

    kind = "reward" if args.reward or args.reward_fn else "policy"
    try:
        if args.model_dir:
            check_model_dir(args.model_dir, kind)
        elif kind == "policy" or args.reward:
            raise ValueError("a model directory is needed (or --reward-fn for a rule-based verifier)")
    except ValueError as e:
        print(f"rayllm: {e}", file=sys.stderr)
        return 2
    import ray

    from rayllm.env import apply_worker_env, remote_env

    apply_worker_env()
    ray.init(address=args.address, runtime_env={"env_vars": remote_env()})
    name = args.name or (Path(args.model_dir).resolve().name if args.model_dir else "verifier")
    if kind == "reward":
        url = start(reward_app(args.model_dir, args.reward_fn, args.replicas, args.num_cpus), name=name,
                    host=args.host, port=args.port)
        print(f"[rayllm] serving {name} (reward) at {url}/score", flush=True)
    else:
        url = start(policy_app(args.model_dir, name, replicas=args.replicas, cpus=args.num_cpus, gpus=args.num_gpus),
                    name=name, host=args.host, port=args.port)
        print(f"[rayllm] serving {name} at {url}/v1 (OpenAI-compatible; model id {name!r})", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    sys.exit(main())
