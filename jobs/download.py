"""Download Revisited Oxford / Paris and the R1M distractors (resumable, atomic, verified, safely extracted).

    python -m jobs.download --dataset roxford5k|rparis6k|revisitop1m --root DIR [--base-url URL]

The work is done by :mod:`storage.download` (sources, layout, checksums and safety rules are described there).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from service.errors import run_cli
from storage.download import GROUND_TRUTH, R1M_ARCHIVES, DownloadError, UnsafeArchiveError, VerificationError, \
    download_dataset

log = logging.getLogger("jobs.download")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, dict[str, str]]:
    ap = argparse.ArgumentParser(prog="python -m jobs.download", description=__doc__.split("\n\n")[0])
    ap.add_argument("--dataset", required=True, choices=sorted(GROUND_TRUTH))
    ap.add_argument("--root", required=True, help="data folder; the dataset goes to <root>/<dataset>/")
    ap.add_argument("--base-url", default=None, help="fetch every file from this URL instead (mirror / test)")
    ap.add_argument("--keep-archives", action="store_true", help="keep the downloaded archives after extraction")
    ap.add_argument("--num-archives", type=int, default=R1M_ARCHIVES, help="R1M: how many of the 100 archives")
    ap.add_argument("--sha256", action="append", default=[], metavar="FILE=HEX", help="pin a file's checksum")
    ap.add_argument("--no-count-check", action="store_true", help="skip the published-size check")
    ap.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    args = ap.parse_args(argv)
    pins = {}
    for item in args.sha256:
        name, _, digest = item.partition("=")
        if not name or len(digest) != 64:
            ap.error(f"--sha256 expects FILE=<64 hex digits>, got {item!r}")
        pins[name] = digest.lower()
    return args, pins


def main(argv: list[str] | None = None) -> int:
    """CLI entry point."""
    args, pins = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")

    def body() -> int:
        try:
            record = download_dataset(args.dataset, args.root, base_url=args.base_url,
                                      keep_archives=args.keep_archives, num_archives=args.num_archives,
                                      expected_counts=None if args.no_count_check else "auto", pins=pins)
        except (DownloadError, UnsafeArchiveError, VerificationError) as exc:
            log.error("%s", exc)
            return 1
        print(json.dumps(record, indent=1, sort_keys=True))
        return 0

    return run_cli(body, args.verbose, "jobs.download")


if __name__ == "__main__":
    sys.exit(main())
