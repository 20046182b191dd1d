"""Search an index run with a query image.

    python -m jobs.search --index <run uri> --query <image path/URI> [--bbox x0,y0,x1,y1] [--method NAME]
                          [--rerank aqe|alphaqe|diffusion ...] [--top-k K] [--html results.html] [--scorer DIR]

``--method`` is a global method (``gem``, ``rmac``, ``os_egm`` ...), ``regional:<source>[@full]`` (D2R regional
search over the run's ``<source>`` regions), an ASMK kernel (``asmk_star``, ``r_asmk_star`` ...) or
``patches[:k]`` (seed 000: k query patches chosen by the scorer ``jobs.train_query_scorer`` trained, default the
run's own, else ``--scorer``), optionally with re-rankings appended (``gem+aqe``, ``regional:os_egm+sv``) or given
with ``--rerank`` (``--rerank sv:100``: spatial verification of the top 100 with the run's keypoints; ``--html``
then also draws each verified result's inlier matches).
The query goes through the run's own extraction (and object saliency against the stored region graph). The Python API is
:class:`service.search.SearchService`. Bad input (a missing index, a non-image query, a malformed box, an
unknown method) gives one line on stderr and exit status 2; ``-v`` shows the traceback.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from service.encoder import parse_bbox
from service.errors import run_cli
from service.html import write_results_page
from service.search import SearchService, known_reranks
from storage.readers import image_uris
from storage.uri import read_bytes


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.search", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="output root of an index run")
    p.add_argument("--query", required=True, help="query image path or URI")
    p.add_argument("--bbox", default=None, help="x0,y0,x1,y1 in query pixels")
    p.add_argument("--method", default="gem")
    p.add_argument("--rerank", action="append", default=[], metavar="NAME[:N]",
                   help=f"re-ranking(s), in order: {', '.join(known_reranks())} (e.g. sv:100, spatial verification "
                        "of the top 100 with the run's keypoints)")
    p.add_argument("--qe", choices=("none", "avg", "alpha"), default="none", help="same as --rerank aqe|alphaqe")
    p.add_argument("--diffusion", action="store_true", help="same as --rerank diffusion")
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--query-egm", choices=("box", "detect"), default="box",
                   help="with --bbox: use the box as the query's FS/OS.EGM region (seed 001) or detect regions in it")
    p.add_argument("--scorer", default=None, help="query-region scorer folder for patches (default: the run's own)")
    p.add_argument("--html", type=Path, default=None, help="also write the results as an HTML page")
    p.add_argument("-v", "--verbose", action="store_true", help="show tracebacks")
    return p.parse_args(argv)


def method_name(args: argparse.Namespace) -> str:
    """``--method`` with the re-rankings of ``--qe`` / ``--diffusion`` / ``--rerank`` appended."""
    extra = {"avg": ["aqe"], "alpha": ["alphaqe"], "none": []}[args.qe] + (["diffusion"] if args.diffusion else [])
    return "+".join([args.method, *extra, *args.rerank])


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def body() -> int:
        bbox = parse_bbox(args.bbox)
        service = SearchService(args.index, query_egm=args.query_egm, scorer=args.scorer)
        method = method_name(args)
        service.spec(method)  # an unknown method fails before the query is read
        results, q = service.search(read_bytes(args.query), bbox, method, args.top_k)
        print(f"{'rank':>4}  {'score':>7}  image_id")
        for r in results:
            print(f"{r.rank + 1:>4}  {r.score:7.4f}  {r.image_id}")
        if args.html:
            write_results_page(args.html, args.query, results, image_uris(args.index, [r.image_id for r in results]),
                               query_image=q.image)
        return 0

    return run_cli(body, args.verbose, "jobs.search")


if __name__ == "__main__":
    sys.exit(main())
