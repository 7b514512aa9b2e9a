"""The storage pipeline: `python prepare_assets.py --step N|all [--root storage] [--config recipes/config.yaml]`.

Steps: 0 environment + cleanup, 1 v2 layout, 2 downloads (local → S3 → hub), 3 Meta → safetensors,
4 reference → safetensors, 5 micro models, 6 CodeContests, 7 MBPP, 8 HumanEval, 9 integrity,
10 README + inventory, 11 checklist. A finished step only verifies (quickly) on a re-run;
--dry-run prints what each step would do. Exit code 0 on success, 1 on a failed step/check.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from assets.layout import Layout
from assets.sources import Fetcher, FetchError
from assets.steps import STEPS, Context
from runtime.cli import ArgumentParser, entry_point
from runtime.config import load_env_config
from runtime.integrity import ChecksumError


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--step", required=True, help="0..11 or all")
    p.add_argument("--root", type=Path, help="storage root (default: storage.root of the config)")
    p.add_argument("--config", help="environment config (default recipes/config.yaml)")
    p.add_argument(
        "--dry-run", action="store_true", help="print what would be done; change nothing"
    )
    p.add_argument(
        "--full-verify",
        action="store_true",
        help="re-hash every file instead of trusting size+mtime stamps",
    )
    p.add_argument("--force", action="store_true", help="run the step even if its check passes")
    return p.parse_args(argv)


def checklist(ctx: Context) -> int:
    print("step | status | title")
    failed = 0
    for step in STEPS:
        problems = step.check(ctx)
        failed += bool(problems)
        print(f"{step.number:>4} | {'PASS' if not problems else 'FAIL'} | {step.title}")
        for problem in problems[:5]:
            print(f"     |        |   {problem}")
    print(f"{len(STEPS) - failed}/{len(STEPS)} steps pass")
    return 1 if failed else 0


def run_step(step, ctx: Context, force: bool) -> int:
    start = time.perf_counter()
    print(f"[step {step.number}] {step.title}", flush=True)
    try:
        problems = step.check(ctx)
    except (ChecksumError, ValueError, OSError) as exc:
        problems = [f"check failed: {exc}"]
    if not problems and not force and not step.always_run:
        print(f"[step {step.number}] already done (verified) in {time.perf_counter() - start:.1f}s")
        return 0
    if ctx.dry_run:
        print(f"[step {step.number}] would run: {step.plan(ctx)}")
        for problem in problems[:10]:
            print(f"    because: {problem}")
        return 0
    if problems:  # why the step runs (a broken cached asset is named here)
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        print(f"[step {step.number}] to do: {problems[0]}{more}", flush=True)
    try:
        step.run(ctx)
    except (
        FetchError,
        ChecksumError,
        FileNotFoundError,
        ValueError,
        PermissionError,
        OSError,
    ) as exc:
        print(f"[step {step.number}] FAILED: {exc}", file=sys.stderr)
        return 1
    remaining = step.check(ctx)
    if remaining:
        print(
            f"[step {step.number}] FAILED verification:\n  " + "\n  ".join(remaining),
            file=sys.stderr,
        )
        return 1
    print(f"[step {step.number}] done in {time.perf_counter() - start:.1f}s")
    return 0


@entry_point
def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    overrides = [f"storage.root={a.root}"] if a.root else []
    config = load_env_config(a.config, overrides)
    layout = Layout(Path(config.storage.root))
    fetcher = Fetcher(
        config, Path(config.storage.cache_dir), [Path(d) for d in config.assets.local_dirs]
    )
    ctx = Context(config, layout, fetcher, dry_run=a.dry_run, full_verify=a.full_verify)
    if a.step == "all":
        for step in STEPS:
            if run_step(step, ctx, a.force):
                return 1
        return checklist(ctx)
    if not (a.step.isascii() and a.step.isdigit()) or not 0 <= int(a.step) <= 11:
        print(f"error: --step {a.step!r} is invalid: allowed 0..11 or all", file=sys.stderr)
        return 2
    if int(a.step) == 11:
        return checklist(ctx)
    return run_step(STEPS[int(a.step)], ctx, a.force)


if __name__ == "__main__":
    sys.exit(main())
