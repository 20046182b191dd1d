"""Visual-word codebook: k-means training and nearest-centroid assignment with FAISS (seed 002 §4.1)."""
from __future__ import annotations

import faiss
import numpy as np


def _gpu_available() -> bool:
    get = getattr(faiss, "get_num_gpus", None)
    return bool(get and get() > 0)


def train_codebook(X: np.ndarray, k: int, niter: int = 20, seed: int = 0, gpu: bool | str = "auto",
                   spherical: bool = False, max_points_per_centroid: int = 256) -> np.ndarray:
    """k-means codebook of ``k`` visual words from descriptors ``X`` (N, D); returns centroids (k, D) float32.

    FAISS ``Kmeans`` subsamples to ``max_points_per_centroid * k`` points, as the reference ``asmk`` package
    does; ``spherical`` re-normalises centroids after each iteration (for L2-normalised descriptors).
    ``gpu='auto'`` uses a GPU when the installed FAISS has one.
    """
    x = np.ascontiguousarray(X, dtype=np.float32)
    if x.ndim != 2 or len(x) < k:
        raise ValueError(f"need at least k={k} descriptors, got {x.shape}")
    use_gpu = _gpu_available() if gpu == "auto" else bool(gpu)
    km = faiss.Kmeans(x.shape[1], int(k), niter=int(niter), seed=int(seed), spherical=spherical, gpu=use_gpu,
                      max_points_per_centroid=int(max_points_per_centroid), verbose=False)
    km.train(x)
    return np.ascontiguousarray(km.centroids, dtype=np.float32)


def assign(X: np.ndarray, centroids: np.ndarray, multiple: int = 1,
           batch: int = 1 << 16) -> tuple[np.ndarray, np.ndarray]:
    """Nearest ``multiple`` visual words of each row of ``X`` (n, D) via a FAISS flat L2 index.

    Returns word ids (n, multiple) int64, nearest first, and squared L2 distances (n, multiple) float32.
    Rows are searched in batches of ``batch`` to bound the distance-matrix memory.
    """
    c = np.ascontiguousarray(centroids, dtype=np.float32)
    x = np.ascontiguousarray(X, dtype=np.float32).reshape(-1, c.shape[1])
    m = int(multiple)
    if not 1 <= m <= len(c):
        raise ValueError(f"multiple must be in [1, {len(c)}], got {multiple}")
    index = faiss.IndexFlatL2(c.shape[1])
    index.add(c)
    ids = np.empty((len(x), m), dtype=np.int64)
    dist = np.empty((len(x), m), dtype=np.float32)
    for s in range(0, len(x), batch):
        dist[s:s + batch], ids[s:s + batch] = index.search(x[s:s + batch], m)
    return ids, dist
