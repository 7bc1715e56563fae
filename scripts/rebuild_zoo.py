#!/usr/bin/env python
"""Rebuild the qconv model zoo: convert, verify and push every entry of scripts/zoo.yaml that changed.

    python scripts/rebuild_zoo.py [--zoo scripts/zoo.yaml] [--only NAME ...] [--dry-run] [--force]

An entry is skipped when its target repo's manifest records the same cache key (source commit +
settings + format version). Failures do not stop the run; the exit status is 1 if any entry failed.
The token comes from --token, HF_TOKEN or the stored login. See docs/hub.md.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

DEFAULT_ZOO = Path(__file__).resolve().parent / "zoo.yaml"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--zoo", type=Path, default=DEFAULT_ZOO, help="zoo file (default: scripts/zoo.yaml)")
    parser.add_argument("--only", action="append", metavar="NAME", help="rebuild only this entry (repeatable, or a,b)")
    parser.add_argument("--dry-run", action="store_true", help="resolve and compare only: convert and push nothing")
    parser.add_argument("--force", action="store_true", help="rebuild even when the cache key matches")
    parser.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the stored login)")
    parser.add_argument("--work-dir", type=Path, default=None, help="where outputs are built (default: a temp dir)")
    parser.add_argument("--keep", action="store_true", help="keep converted outputs in --work-dir")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(name)s: %(message)s")

    from qconv.converter.push import resolve_token
    from qconv.converter.zoo import format_table, load_zoo, rebuild_zoo
    from qconv.errors import QconvError

    only = [name for item in args.only or [] for name in item.split(",") if name]
    try:
        entries = load_zoo(args.zoo)
        results = rebuild_zoo(entries, token=resolve_token(args.token), only=only, dry_run=args.dry_run,
                              force=args.force, work_dir=args.work_dir, keep=args.keep)
    except QconvError as exc:
        print(f"rebuild_zoo: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(results, entries))
    return 1 if any(r.failed for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
