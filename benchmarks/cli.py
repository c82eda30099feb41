"""Command line: ``prefbench <command>`` or ``python -m benchmarks <command>``.

  run      run a suite's stages (cached), print where the artefacts are
  results  rebuild a run's tables from its finished stages without running any
  config   print a suite's resolved config
  stages   list stages and their cache folders for a suite
  suites   list available suites
"""

from __future__ import annotations

import argparse
import signal
import sys
import traceback

from benchmarks import interrupts
from benchmarks.config import ConfigError, available_suites, load_suite, to_yaml
from benchmarks.errors import DiskFullError


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
    p = sub.add_parser("results", help="rebuild a run's tables from its finished stages, running none")
    _common(p)
    p = sub.add_parser("config", help="print the resolved config")
    _common(p)
    p = sub.add_parser("stages", help="list stages and cache folders")
    _common(p)
    sub.add_parser("suites", help="list suites")
    p = sub.add_parser("compare", help="where two runs of a suite first diverge (stage artefact checksums)")
    p.add_argument("run_a", help="run folder, e.g. results/runs/smoke")
    p.add_argument("run_b", help="another run folder (e.g. copied from another machine)")
    p = sub.add_parser("verify", help="check every finished stage of a cache against its manifest (sizes, SHA-256)")
    p.add_argument("--cache", default="results/cache", help="cache folder (default results/cache)")
    p.add_argument("--move-aside", action="store_true", help="rename damaged stage folders so that runs rebuild them")
    p = sub.add_parser("check", help="regression gate: compare a run's summary with results/baseline/")
    p.add_argument("--run", default="results/runs/smoke", help="run folder with summary.json")
    p.add_argument("--baseline", default="results/baseline",
                   help="baseline folder (<folder>/<suite>/<machine kind>.json, the run's kind chosen) or one file")
    p.add_argument("--perf", default="results/perf/dpo_vs_trl.json", help="speed benchmark JSON (optional)")
    p.add_argument("--require-claims", default="", metavar="ID,ID",
                   help="paper claims (summary.json 'claims', report section 'Paper claims') that must hold")
    p = sub.add_parser("baseline", help="write results/baseline/ from a run (deliberately)")
    p.add_argument("--run", default="results/runs/smoke")
    p.add_argument("--baseline", default="results/baseline",
                   help="folder (writes <folder>/<suite>/<this machine's kind>.json) or a .json file")
    p.add_argument("--perf", default="results/perf/dpo_vs_trl.json")
    p = sub.add_parser("report", help="build the HTML report and figures of a run")
    p.add_argument("--run", default=None, help="run folder (default: results/runs/<suite>)")
    p.add_argument("--suite", default="default")
    return ap


def _gate(args) -> int:
    from pathlib import Path

    from benchmarks import regression, utils
    from benchmarks.results import check_same_run

    check_same_run(Path(args.run))
    run = Path(args.run) / "summary.json"
    perf_path = Path(args.perf)
    perf = regression.load(perf_path) if perf_path.exists() else None
    if args.cmd == "baseline":
        base = regression.compact(regression.load(run), perf)
        target = Path(args.baseline)
        if target.suffix != ".json":  # a folder: one file per suite and machine kind
            target = target / base["suite"] / f"{base['kind'] or 'unknown'}.json"
        utils.atomic_write_json(target, base)
        print(f"prefbench: baseline written to {target} (kind {base['kind']}, {len(base['arms'])} arms, "
              f"seeds {base['seeds']}{', perf ratio' if 'perf' in base else ''})")
        return 0
    current = regression.load(run)
    rows, ok, which = regression.check(current, regression.load_baselines(Path(args.baseline), current["suite"]), perf)
    print(which)
    print(regression.format_table(rows))
    required = [c for c in args.require_claims.split(",") if c.strip()]
    claims_ok, lines = regression.required_claims(current, required)
    for line in lines:
        print(line)
    why = [w for w, bad in (("a metric left its band (see REGRESSION rows)", not ok),
                            ("a required claim does not hold", not claims_ok)) if bad]
    print(f"\nprefbench check: {'PASSED' if not why else 'FAILED: ' + '; '.join(why)}")
    return 0 if not why else 1


def _compare(args) -> int:
    import json
    from pathlib import Path

    from benchmarks.harness import compare_runs

    idx = []
    for r in (args.run_a, args.run_b):
        f = Path(r) / "stages.json"
        if not f.exists():
            raise FileNotFoundError(f"{r}: no stages.json (is this a run folder?)")
        idx.append(json.loads(f.read_text()))
    first, rows = compare_runs(*idx)
    for n, status in rows:
        print(f"{n:<34} {status}")
    if first is None:
        print("prefbench compare: every stage with a checksum in both runs produced bit-identical artefacts")
    else:
        print(f"prefbench compare: the runs first diverge at {first}; every stage before it is bit-identical "
              f"(a difference there flows into every stage that reads it)")
    return 0


def _verify(args) -> int:
    """Every finished stage under the cache against the manifest in its stage.json, every file hashed."""
    import json
    from pathlib import Path

    from benchmarks import utils

    root = Path(args.cache)
    if not root.is_dir():
        raise FileNotFoundError(f"--cache {root}: no such folder")
    n_ok = n_old = 0
    damaged = []
    for meta_path in sorted(root.rglob("stage.json")):
        folder = meta_path.parent
        if folder.name.startswith("."):
            continue  # already moved aside
        try:
            meta = json.loads(meta_path.read_text())
        except (OSError, ValueError) as e:
            damaged.append((folder, [f"stage.json unreadable: {e}"]))
            continue
        if "manifest" not in meta:
            n_old += 1
            continue
        problems = utils.verify_manifest(folder, meta["manifest"], full=True)
        if problems:
            damaged.append((folder, problems))
        else:
            n_ok += 1
    for folder, problems in damaged:
        where = f" -> moved to {utils.move_aside(folder, 'damaged')}" if args.move_aside else ""
        print(f"DAMAGED {folder.relative_to(root)}: {'; '.join(problems)}{where}")
    print(f"prefbench verify: {n_ok} stage(s) intact, {len(damaged)} damaged, {n_old} without a manifest "
          f"(finished before manifests existed: not verifiable) under {root}")
    return 1 if damaged else 0


def _stage_registry(cfg):
    from benchmarks.arms import build_stages

    return build_stages(cfg)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.cmd == "suites":
            print("\n".join(available_suites()))
            return 0
        if args.cmd == "verify":
            return _verify(args)
        if args.cmd == "compare":
            return _compare(args)
        if args.cmd in ("check", "baseline"):
            return _gate(args)
        if args.cmd == "report":
            from pathlib import Path

            from benchmarks.report.html import main as report_main

            run = args.run or str(Path(load_suite(args.suite).runs_dir) / args.suite)
            return report_main(["--run", run])
        import benchmarks.arms  # noqa: F401 - registers the built-in arm families before the config names them

        cfg = load_suite(args.suite, args.overrides)
        if args.cmd == "config":
            print(to_yaml(cfg), end="")
            return 0
        from benchmarks.harness import Harness

        if args.cmd == "run":  # bad external inputs (model folder, preference file, read-only cache): exit 2, nothing written
            from benchmarks.preflight import check_inputs

            check_inputs(cfg)
        stages, default_targets = _stage_registry(cfg)
        h = Harness(cfg, stages, run_missing=args.cmd != "results", rebuildable=True)
        if args.cmd == "stages":
            for name in stages:
                print(f"{name:>8}  {h.stage_dir(name)}")
            return 0
        targets = args.stages.split(",") if getattr(args, "stages", None) else default_targets
        unknown = [t for t in targets if t not in stages]
        if unknown:
            raise ConfigError(f"unknown stage(s) {unknown}; stages are {list(stages)}")
        if h.dist.is_main:
            procs = f", {h.dist.world_size} processes" if h.dist.distributed else ""
            print(f"prefbench: suite '{cfg.name}' on {h.device} ({cfg.dtype}), seed {cfg.seed}{procs}")
        run_dir = h.root / cfg.runs_dir / cfg.name
        interrupts.install()  # SIGINT/SIGTERM: trainers checkpoint and stop, the run exits 130/143 saying how to resume
        h.run(targets, run_dir=run_dir)
        if not h.dist.is_main:  # under accelerate launch only rank 0 writes the run's tables and prints
            return 0
        from benchmarks.harness import root_cause

        arms_ok = [n for n in h.results if n.startswith("eval/") and n != "eval/sft"]
        wanted_arms = [n for n in targets if n.startswith("eval/") and n != "eval/sft"]
        if "eval/sft" in targets and "eval/sft" not in h.results or (wanted_arms and not arms_ok):
            what = "the reference's evaluation (eval/sft) failed" if "eval/sft" not in h.results else "no arm succeeded"
            print(f"prefbench: run FAILED: {what}, so no tables were written (the previous run's are in "
                  f"{run_dir / 'previous'}). {root_cause(h.failed, stages, targets)}", file=sys.stderr)
            return 1
        if "eval/sft" in h.results:
            from benchmarks.results import collect, print_table

            summary = collect(h, run_dir)
            print("\n" + print_table(summary))
            if summary.get("verdict"):
                import textwrap

                print("\nVerdict (generated from the tables above):\n" + textwrap.fill(summary["verdict"]["text"], 110))
            if summary["failed_arms"]:
                print(f"\nFAILED arms (the suite went on without them): {sorted(summary['failed_arms'])}")
        print(f"prefbench: done. Run folder: {run_dir} (resolved_config.yaml, stages.json, summary.csv, samples.parquet)")
        return 0
    except DiskFullError as e:
        print(f"prefbench: run FAILED: {e.strerror}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, interrupts.Interrupted) as e:
        signum = getattr(e, "signum", None) or interrupts.signum() or signal.SIGINT
        what = f" ({e})" if isinstance(e, interrupts.Interrupted) else ""
        print(f"prefbench: interrupted by {signal.Signals(signum).name}{what}. Finished stages are cached and a trainer "
              f"stopped mid-way resumes from its checkpoint: run the same command to resume.", file=sys.stderr)
        return 128 + int(signum)
    except Exception as e:  # one clear paragraph; traceback only with --debug
        if args.debug:
            traceback.print_exc()
        print(f"prefbench: error: {type(e).__name__}: {e}", file=sys.stderr)
        if not args.debug:
            print("(re-run with --debug for the traceback)", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
