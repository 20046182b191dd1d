"""Issue 17 end to end: index -> mine_pairs -> train_projection -> index with ``whiten.kind: learned`` -> benchmark.

    python -m experiments.learned_projection_e2e --data ../shared/data/museum-landmarks --out runs/bench17 \
        [--epochs 10] [--dim 256] [--run]            # without --run: print the commands and check what exists

Prints the five commands (and runs them with ``--run``). After mining it prints, as a CHECK ONLY, the number of
mined pairs per kind and their precision against the dataset's ground truth (a pair is correct when both images
belong to the same non-distractor group of ``gnd.json``'s ``groups``). Neither the mining nor the training reads
the ground truth: this script reads it after the pairs are written, and nothing it computes goes back into them.
"""
from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np

from storage.readers import image_uris
from storage.training import default_pairs_location, load_pairs
from storage.uri import exists


def commands(data: str, out: str, epochs: int, dim: int | None) -> list[list[str]]:
    """The end-to-end commands: index (via the benchmark), mining, training, learned index + benchmark."""
    index = f"{out}/index"
    py = [sys.executable, "-m"]
    train = py + ["jobs.train_projection", "--index", index, "--epochs", str(epochs)] + \
        (["--dim", str(dim)] if dim else [])
    return [py + ["jobs.benchmark", "--dataset", data, "--out", out, "--methods", "rmac"],
            py + ["jobs.mine_pairs", "--index", index],
            train,
            py + ["jobs.benchmark", "--dataset", data, "--out", out, "--index-set", "whiten.kind=learned",
                  "--index-set", f"whiten.projection={index}", "--methods", "rmac,rmac_learned"]]


def pair_precision(index: str, data: str) -> dict[str, dict[str, float]]:
    """Per kind of mined pair: count and precision against the ground-truth groups (a check only)."""
    gnd = json.loads(Path(data, "gnd.json").read_text())
    group = dict(zip(gnd["imlist"], gnd["groups"]))
    stem = {i: Path(u).stem for i, u in image_uris(index).items()}
    pairs = load_pairs(default_pairs_location(index))
    kinds = np.asarray(pairs.column("kind").to_pylist())
    ga = np.asarray([group.get(stem.get(i, i), "?") for i in pairs.column("image_a").to_pylist()])
    gb = np.asarray([group.get(stem.get(i, i), "?") for i in pairs.column("image_b").to_pylist()])
    same = (ga == gb) & (ga != "distractor") & (ga != "?")
    return {str(k): {"pairs": int((kinds == k).sum()), "precision": round(float(same[kinds == k].mean()), 4)}
            for k in np.unique(kinds)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="dataset folder with gnd.json (museum-landmarks)")
    ap.add_argument("--out", required=True, help="benchmark output folder (the index goes to <out>/index)")
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--dim", type=int, default=None)
    ap.add_argument("--run", action="store_true", help="run the commands (else print them)")
    args = ap.parse_args()
    for n, cmd in enumerate(commands(args.data, args.out, args.epochs, args.dim), 1):
        print(f"[{n}] {shlex.join(cmd[1:])}", flush=True)
        if args.run:
            subprocess.run(cmd, check=True)
        if n == 2 and exists(default_pairs_location(f"{args.out}/index")):
            # CHECK ONLY: the ground truth is read here, after mining, and never by the mining or the training
            print("mined pairs vs ground truth (check only):",
                  json.dumps(pair_precision(f"{args.out}/index", args.data)), flush=True)


if __name__ == "__main__":
    main()
