"""Train the region proposal network (seed 003 §3.2) on the boxes the corpus discovered itself (issue 17).

    python -m jobs.train_rpn --index <run> [--out <folder URI>] [--images 200] [--iterations 2000] [--seed 0]

Targets are the run's OS.EGM boxes (``regions`` rows with ``source = os_egm``, from the object_saliency stage;
never a ground truth), on the scale-1 activation maps of a seeded sample of ``--images`` indexed images (the
run's backbone, frozen). The head (anchors, objectness, box regression: ``pipeline.rpn``) is stored as arrays
(``rpn.npz``, no pickle) with ``info.json`` in ``--out`` (default: the run's ``rpn`` artefact). Use it with
``jobs.index --set regions.source=rpn [--set regions.rpn=<folder>]``: an ``rpn`` pass adds ``rpn`` regions,
``rmac_rpn`` (and ``rmac_learned_rpn`` with ``whiten.kind: learned``) and the ``regional_rpn`` index.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import sys
import time
from typing import Sequence

from actors.common import Progress
from actors.rpn import rpn_samples
from jobs.index import setup_logging
from pipeline.rpn import RPNConfig, train_rpn
from service.errors import UserError, run_cli
from storage.training import default_rpn_location, save_rpn


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.train_rpn", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="output root of the index run (needs its object_saliency stage)")
    p.add_argument("--out", default=None, help="RPN folder URI (default: the run's rpn artefact)")
    p.add_argument("--images", type=int, default=200, help="training images (seeded sample)")
    d = RPNConfig()
    p.add_argument("--iterations", type=int, default=d.iterations, help="steps of one image each")
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("-v", "--verbose", action="store_true")
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> int:
    cfg = dataclasses.replace(RPNConfig(), iterations=args.iterations, lr=args.lr, seed=args.seed)
    t0 = time.time()
    try:
        samples, ids = rpn_samples(args.index, args.images, args.seed)
    except RuntimeError as exc:
        raise UserError(str(exc)) from None
    t_maps = time.time() - t0
    losses: list[dict] = []
    progress = Progress("train_rpn", cfg.iterations, unit="steps", every=10.0)

    def on_step(step: int, loss: dict) -> None:
        losses.append(loss)
        progress.update(1)

    arrays = train_rpn(cfg, samples, step_callback=on_step)
    last = losses[-min(len(losses), 100):]
    tail = {k: sum(x[k] for x in last) / max(len(last), 1) for k in ("cls", "box")}
    info = {"kind": "rpn", "config": cfg.to_dict(), "index": args.index, "images": ids,
            "targets": int(sum(len(b) for _, b in samples)), "target_source": "os_egm",
            "seconds_maps": t_maps, "seconds": time.time() - t0, "final_loss": tail,
            "created_at": dt.datetime.now(dt.timezone.utc).isoformat()}
    out = args.out or default_rpn_location(args.index)
    save_rpn(out, arrays, info)
    print(f"[train_rpn] {len(ids)} images, {info['targets']} OS.EGM boxes, {cfg.iterations} steps in "
          f"{info['seconds']:.1f} s (loss of the last steps: cls {tail['cls']:.4f}, box {tail['box']:.4f}); "
          f"written to {out}", flush=True)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    return run_cli(lambda: run(args), args.verbose, "jobs.train_rpn")


if __name__ == "__main__":
    sys.exit(main())
