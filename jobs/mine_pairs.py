"""Mine training pairs for the learned projection from an index run itself (issue 17; never a ground truth).

    python -m jobs.mine_pairs --index <run> [--out <pairs.parquet URI>] [--k 30] [--no-keypoints]
        [--min-inliers N] [--weak-min-sim 0.7] [--max-pairs-per-image 20] [--num-cpus N] [--ray-address ADDR]

Reads the run's graph artefacts (whitened regions, their FAISS index, the mutual k-NN graph) and, when the run
has a ``keypoints`` table, its keypoints; mining runs as Ray tasks over blocks of regions (candidates) and of
pairs (spatial verification with the run's ``verify`` settings). Labels: with keypoints ``positive`` (mutual
neighbours with at least ``--min-inliers`` inliers, default the run's ``verify.min_inliers``) and
``hard_negative`` (similar neighbours that fail verification); without them the weaker ``weak_positive``
(mutual neighbours above ``--weak-min-sim``) and ``weak_negative`` (near neighbours with no mutual region pair).
Writes a Parquet table with the evidence (inliers, similarity, kind) to ``--out``
(default: the run's ``mined_pairs`` artefact, with an ``info.json`` beside it).
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from typing import Sequence

from actors.common import init_ray
from actors.mine_pairs import mine_pairs
from jobs.index import setup_logging
from pipeline.config import config_from_dict
from pipeline.pair_mining import MiningConfig
from service.errors import UserError, run_cli
from storage.artefacts import has_graph
from storage.layout import RunLayout
from storage.run import load_run_config
from storage.training import default_pairs_location, save_pairs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.mine_pairs", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="output root of the index run (needs its graph stage)")
    p.add_argument("--out", default=None, help="pairs Parquet URI (default: the run's mined_pairs artefact)")
    p.add_argument("--k", type=int, default=None, help="neighbours per region (default: the graph's k)")
    p.add_argument("--no-keypoints", action="store_true", help="ignore a keypoints table: weak labels only")
    d = MiningConfig()
    p.add_argument("--min-inliers", type=int, default=d.min_inliers,
                   help="inliers of a positive pair (default: the run's verify.min_inliers, +sv's threshold)")
    p.add_argument("--max-negative-inliers", type=int, default=d.max_negative_inliers)
    p.add_argument("--weak-min-sim", type=float, default=d.weak_min_sim)
    p.add_argument("--weak-min-pairs", type=int, default=d.weak_min_pairs)
    p.add_argument("--weak-negative-rank", type=int, default=d.weak_negative_rank)
    p.add_argument("--max-pairs-per-image", type=int, default=d.max_pairs_per_image,
                   help="pairs verified per image (the most similar ones)")
    p.add_argument("--block-rows", type=int, default=20_000, help="regions per Ray task")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.add_argument("--ray-address", default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def mining_config(args: argparse.Namespace) -> MiningConfig:
    """The thresholds given on the command line."""
    return dataclasses.replace(MiningConfig(), min_inliers=args.min_inliers,
                               max_negative_inliers=args.max_negative_inliers, weak_min_sim=args.weak_min_sim,
                               weak_min_pairs=args.weak_min_pairs, weak_negative_rank=args.weak_negative_rank,
                               max_pairs_per_image=args.max_pairs_per_image)


def run(args: argparse.Namespace) -> int:
    if not has_graph(args.index):
        raise UserError(f"{args.index}: no region graph (run jobs.index with the graph stage first)")
    t0 = time.time()
    init_ray(args.ray_address, args.num_cpus)
    verify = config_from_dict(load_run_config(args.index)).verify  # the run's matcher, MAGSAC and threshold
    columns, info = mine_pairs(args.index, mining_config(args), k=args.k, block_rows=args.block_rows,
                               verify=verify, use_keypoints=not args.no_keypoints)
    info.update(index=args.index, seconds=time.time() - t0)
    out = args.out or default_pairs_location(args.index)
    info_uri = RunLayout(args.index).artefact("mined_pairs_info") if args.out is None else None
    save_pairs(out, columns, info, info_uri)
    evidence = "spatially verified" if info["verified"] else "mutual k-NN + similarity only (weaker, no keypoints)"
    print(f"[mine_pairs] {len(columns['kind'])} pairs from {info['candidates']} candidates of {info['images']} "
          f"images ({evidence}): {info['counts']}; written to {out} in {info['seconds']:.1f} s", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run_cli(lambda: run(args), args.verbose, "jobs.mine_pairs")


if __name__ == "__main__":
    sys.exit(main())
