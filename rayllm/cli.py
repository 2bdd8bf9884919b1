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
    show = sub.add_parser("config", help="print the validated config of a pipeline as YAML")
    show.add_argument("pipeline")
    show.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    args = ap.parse_args(argv)
    try:
        pipe = load_pipeline(args.pipeline, args.overrides)
    except ConfigError as e:
        print(f"rayllm: {e}", file=sys.stderr)
        return 2
    if args.cmd == "config":
        import yaml

        print(yaml.safe_dump(pipe.model_dump(mode="json"), sort_keys=False))
        return 0
    from rayllm.runner import run_pipeline

    run_pipeline(pipe, progress=not args.no_progress)
    return 0


if __name__ == "__main__":
    sys.exit(main())
