"""The command line of a prepare: `python -m codistill.prepare --config JOB [--set a.b=c ...] --out DIR_OR_URI`."""

from __future__ import annotations

import argparse
import logging
import sys

from codistill.errors import CodistillError, ConfigError

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m codistill.prepare",
        description="Tokenize a job's corpus (or decode its images) into shards with Ray Data, once; then train "
        "with data.train set to --out.",
    )
    parser.add_argument("--config", default=None, help="job file or bundled job name (default: quickstart)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a job value")
    parser.add_argument("--out", required=True, help="folder or pyarrow.fs URI (s3://, gs://, ...) to write to")
    parser.add_argument("--shard-mb", type=float, default=64.0, help="input text (or decoded images) per shard")
    parser.add_argument(
        "--local", action="store_true", help="run in this process, without Ray (small data, or no cluster)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(message)s")
    try:
        from codistill.config import load_job
        from codistill.prepare.pipeline import prepare

        if not args.shard_mb > 0:
            raise ConfigError("--shard-mb", args.shard_mb, "a number of megabytes > 0")
        cfg = load_job(args.config, args.set)
        prepare(cfg.data, args.out, shard_mb=args.shard_mb, runner="local" if args.local else "ray")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except CodistillError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"prepare interrupted; run the same command again to resume it: {' '.join(sys.argv)}", file=sys.stderr)
        return 130
    return 0
