"""Command line: ``prefbench <command>`` or ``python -m benchmarks <command>``.

  run      run a suite's stages (cached), print where the artefacts are
  config   print a suite's resolved config
  stages   list stages and their cache folders for a suite
  suites   list available suites
"""

from __future__ import annotations

import argparse
import sys
import traceback

from benchmarks.config import ConfigError, available_suites, load_suite, to_yaml


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--suite", default="default", help="suite name under benchmarks/configs/ or a YAML path")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set sft.steps=50 (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog="prefbench", description="DPO vs RLHF benchmark suite")
    ap.add_argument("--debug", action="store_true", help="show tracebacks")
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("run", help="run a suite (every stage cached by config hash)")
    _common(p)
    p.add_argument("--stages", default=None, help="comma-separated stages to run (default: all of the suite)")
    p = sub.add_parser("config", help="print the resolved config")
    _common(p)
    p = sub.add_parser("stages", help="list stages and cache folders")
    _common(p)
    sub.add_parser("suites", help="list suites")
    return ap


def _stage_registry(cfg):
    from benchmarks.arms import build_stages

    return build_stages(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "suites":
            print("\n".join(available_suites()))
            return 0
        cfg = load_suite(args.suite, args.overrides)
        if args.cmd == "config":
            print(to_yaml(cfg), end="")
            return 0
        from benchmarks.harness import Harness

        stages, default_targets = _stage_registry(cfg)
        h = Harness(cfg, stages)
        if args.cmd == "stages":
            for name in stages:
                print(f"{name:>8}  {h.stage_dir(name)}")
            return 0
        targets = args.stages.split(",") if args.stages else default_targets
        unknown = [t for t in targets if t not in stages]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(stages)}")
        print(f"prefbench: suite '{cfg.name}' on {h.device} ({cfg.dtype}), seed {cfg.seed}")
        run_dir = h.root / cfg.runs_dir / cfg.name
        h.run(targets, run_dir=run_dir)
        if "eval/sft" in h.results:
            from benchmarks.results import collect, print_table

            summary = collect(h, run_dir)
            print("\n" + print_table(summary))
            if summary["failed_arms"]:
                print(f"\nFAILED arms (the suite went on without them): {sorted(summary['failed_arms'])}")
        print(f"prefbench: done. Run folder: {run_dir} (resolved_config.yaml, stages.json, summary.csv, samples.parquet)")
        return 0
    except KeyboardInterrupt:
        print("prefbench: interrupted; finished stages are cached, re-run the same command to resume", file=sys.stderr)
        return 130
    except Exception as e:  # one clear paragraph; traceback only with --debug
        if args.debug:
            traceback.print_exc()
        print(f"prefbench: error: {type(e).__name__}: {e}", file=sys.stderr)
        if not args.debug:
            print("(re-run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
