"""Issue 17 end to end: index -> mine_pairs -> train_projection -> index with ``whiten.kind: learned`` -> benchmark.

    python -m experiments.learned_projection_e2e --data ../shared/data/museum-landmarks --out runs/bench17 \
        [--epochs 10] [--dim 256] [--run]            # without --run: print the commands and check what exists

Prints the five commands (and runs them with ``--run``). After mining it prints, as a CHECK ONLY, the number of
mined pairs per kind and their precision against the dataset's ground truth (:func:`pair_precision`: a pair is
correct when its images share an object of the ground truth, over the pairs it can judge). Neither the mining
nor the training reads the ground truth: this script reads it after the pairs are written, and nothing it
computes goes back into them.
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


def object_identities(data: str) -> dict[str, set[str]]:
    """Image id -> the ground truth's objects it shows, from ``gnd.json`` of ``data`` and of its sub-folders
    (tracks): a database image's non-distractor group, and for a query also the groups of its easy / hard
    positives (a query photo in another track's database is filed under its own group there). Distractors show
    no known object."""
    ident: dict[str, set[str]] = {}
    for gnd_path in [Path(data, "gnd.json"), *sorted(Path(data).glob("*/gnd.json"))]:
        g = json.loads(gnd_path.read_text())
        for i, grp in zip(g["imlist"], g["groups"]):
            ident.setdefault(i, set()).update({grp} - {"distractor"})
        for q, gq in zip(g["qimlist"], g["gnd"]):
            for j in [*gq.get("easy", []), *gq.get("hard", [])]:
                ident.setdefault(q, set()).update({g["groups"][j]} - {"distractor"})
    return ident


def pair_precision(index: str, data: str) -> dict[str, dict[str, float]]:
    """Per kind of mined pair (a check only): its count, how many the ground truth can judge (at least one image
    shows a known object; pairs of two distractors cannot be judged: Caltech categories often hold the same photo
    or object twice) and the fraction of those whose images share an object."""
    ident = object_identities(data)
    stem = {i: Path(u).stem for i, u in image_uris(index).items()}
    pairs = load_pairs(default_pairs_location(index))
    kinds = np.asarray(pairs.column("kind").to_pylist())
    a = [ident.get(stem.get(i, i), set()) for i in pairs.column("image_a").to_pylist()]
    b = [ident.get(stem.get(i, i), set()) for i in pairs.column("image_b").to_pylist()]
    judgeable = np.array([bool(x or y) for x, y in zip(a, b)])
    same = np.array([bool(x & y) for x, y in zip(a, b)])
    out = {}
    for k in np.unique(kinds):
        m = (kinds == k) & judgeable
        out[str(k)] = {"pairs": int((kinds == k).sum()), "judgeable": int(m.sum()),
                       "precision": round(float(same[m].mean()), 4) if m.any() else float("nan")}
    return out


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
