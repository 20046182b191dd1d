"""Train the learned R-MAC projection (seed 003's shift + FC, triplet loss) on pairs mined from the index itself.

    python -m jobs.train_projection --index <run> [--pairs <pairs.parquet URI>] [--out <folder URI>]
        [--epochs 10] [--dim 256] [--margin 0.1] [--lr 0.001] [--seed 0] [--kinds positive,weak_positive]
        [--workers 1] [--gpu] [--plain] [--num-cpus N] [--ray-address ADDR] [--sources full,grid]

The training data are the run's stored regional MACs (``--sources``: ``full`` + ``grid`` by default, the R-MAC
regions; ``full,rpn`` for a run with RPN regions; the backbone stays frozen) and the positives of
``jobs.mine_pairs`` (``--pairs``, default the run's own table); the layer starts from the run's PCA-whitening and
re-mines hard negatives every epoch (``pipeline.projection``). Ray Train's ``TorchTrainer`` runs it (``--workers``
workers, ``--gpu`` for GPU workers; ``--plain`` runs the same function in this process, with the same result for one
CPU worker). Writes ``projection.npz`` (arrays, no pickle) and ``info.json`` (the config, the pairs, the epochs'
statistics) to ``--out`` (default: the run's ``learned_projection`` artefact). Apply it with ``jobs.index --set
whiten.kind=learned --set whiten.projection=<folder>``: the run gets ``rmac_learned`` next to the PCA-whitened
``rmac``.
"""
from __future__ import annotations

import argparse
import datetime as dt
import sys
import tempfile
import time
from typing import Any, Sequence

from actors.common import init_ray
from actors.train import load_triplet_data, train_projection_ray
from jobs.index import setup_logging
from pipeline.descriptors import RMAC_SOURCES
from pipeline.pair_mining import POSITIVE, WEAK_POSITIVE
from pipeline.projection import LearnedProjection, ProjectionConfig, TripletData, train_projection, triplet_accuracy
from service.errors import UserError, run_cli
from storage.artefacts import load_whitening_arrays
from storage.training import default_pairs_location, default_projection_location, load_pairs, save_projection
from storage.uri import exists

ACCURACY_MAX_IMAGES = 20_000


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train_projection", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="output root of the index run (regions + whitening)")
    p.add_argument("--pairs", default=None, help="mined pairs (default: the run's jobs.mine_pairs table)")
    p.add_argument("--out", default=None, help="projection folder URI (default: the run's artefact)")
    p.add_argument("--sources", default=",".join(RMAC_SOURCES),
                   help="the regions whose MACs make each image's R-MAC during training (default full,grid: the "
                        "rmac_learned descriptor; full,rpn trains for rmac_learned_rpn's RPN regions)")
    p.add_argument("--kinds", default=f"{POSITIVE},{WEAK_POSITIVE}", help="pair kinds used as positives")
    d = ProjectionConfig()
    p.add_argument("--epochs", type=int, default=d.epochs)
    p.add_argument("--dim", type=int, default=d.dim, help="output width (default: the whitening's)")
    p.add_argument("--margin", type=float, default=d.margin)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--workers", type=int, default=1, help="Ray Train workers")
    p.add_argument("--gpu", action="store_true", help="GPU workers")
    p.add_argument("--plain", action="store_true", help="train in this process (no Ray Train)")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of a local Ray")
    p.add_argument("--ray-address", default=None)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def train(args: argparse.Namespace, cfg: ProjectionConfig, data: Any, init: dict) -> tuple[dict, dict]:
    """(arrays, last epoch's metrics) from Ray Train, or from a plain call with ``--plain``."""
    if args.plain:
        metrics: dict = {}
        arrays = train_projection(cfg, data, init, epoch_callback=lambda e, s, a: metrics.update(s))
        return arrays, metrics
    init_ray(args.ray_address, args.num_cpus)
    with tempfile.TemporaryDirectory() as tmp:   # Ray Train's per-epoch checkpoints; the result goes to --out
        run = train_projection_ray(cfg, data, init, storage_path=tmp, num_workers=args.workers, use_gpu=args.gpu)
    return run.arrays, run.metrics


def accuracies(data: TripletData, init: dict, arrays: dict, dim: int | None,
               max_images: int = ACCURACY_MAX_IMAGES) -> dict[str, float]:
    """Share of mined triplets ranked right before and after training (on the training pairs themselves: a sanity
    check, not an evaluation); skipped above ``max_images`` images (it compares every pair with every image)."""
    if data.n_images > max_images:
        return {}
    before = LearnedProjection.from_whitening(init["mean"], init["projection"], dim).describe(data)
    return {"before": triplet_accuracy(before, data),
            "after": triplet_accuracy(LearnedProjection.from_arrays(arrays).describe(data), data)}


def run(args: argparse.Namespace) -> int:
    pairs_uri = args.pairs or default_pairs_location(args.index)
    if not exists(pairs_uri):
        raise UserError(f"{pairs_uri}: no mined pairs (run python -m jobs.mine_pairs --index {args.index} first)")
    kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
    sources = tuple(x.strip() for x in args.sources.split(",") if x.strip())
    try:
        data, names = load_triplet_data(args.index, load_pairs(pairs_uri), sources=sources, accept=kinds)
    except RuntimeError as exc:   # no regions of these sources in the run
        raise UserError(str(exc)) from None
    if data.positives.shape[0] == 0:
        raise UserError(f"{pairs_uri}: no pairs of kinds {list(kinds)} among the run's images")
    init = load_whitening_arrays(args.index)["regions"]
    cfg = ProjectionConfig(dim=args.dim, margin=args.margin, lr=args.lr, epochs=args.epochs,
                           batch_size=args.batch_size, seed=args.seed)
    t0 = time.time()
    arrays, metrics = train(args, cfg, data, init)
    seconds = time.time() - t0
    acc = accuracies(data, init, arrays, args.dim)
    info = {"kind": "learned_projection", "config": cfg.to_dict(), "index": args.index, "seconds": seconds,
            "pairs": {"uri": pairs_uri, "kinds": list(kinds), "positives": int(data.positives.shape[0])},
            "images": len(names), "regions": int(data.regions.shape[0]), "sources": list(sources),
            "runner": "plain" if args.plain else
            f"ray_train x{args.workers}", "metrics": metrics, "triplet_accuracy": acc,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    out = args.out or default_projection_location(args.index)
    save_projection(out, arrays, info)
    print(f"[train_projection] {data.positives.shape[0]} positive pairs over {len(names)} images, {cfg.epochs} "
          f"epochs in {seconds:.1f} s; triplet accuracy {acc.get('before', float('nan')):.4f} -> "
          f"{acc.get('after', float('nan')):.4f}; written to {out}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run_cli(lambda: run(args), args.verbose, "jobs.train_projection")


if __name__ == "__main__":
    sys.exit(main())
