"""The optional reference of ``experiments.bench_asmk``: the ``asmk`` package (Tolias et al., version 0.1.1).

It is not a dependency of the project and is normally not installed. When it is importable (or found under
``--asmk-path``, e.g. after ``pip install --target /some/dir --no-deps asmk==0.1.1``, which builds its Cython
extension), the benchmark feeds it the very descriptors, codebook and word ids ours gets and compares
scores, mAP, index sizes and times; otherwise those columns are skipped and the benchmark says so.
"""
from __future__ import annotations

import sys
from importlib import metadata
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, Callable

import numpy as np


@dataclass
class Reference:
    """The reference package's modules."""

    codebook: ModuleType
    index: ModuleType
    kernel: ModuleType
    inverted_file: ModuleType
    io_helpers: ModuleType
    version: str

    def codebook_of(self, centroids: np.ndarray) -> Any:
        """Its ``Codebook`` over our centroids (same FAISS ``IndexFlatL2`` search as ours)."""
        cdb = self.codebook.Codebook(self.index.initialize_index(None), size=len(centroids))
        cdb.index(np.ascontiguousarray(centroids, dtype=np.float32))
        return cdb


def import_reference(path: str | None = None) -> Reference | None:
    """The ``asmk`` package when importable (``path`` is put first on ``sys.path``), else None."""
    if path and str(Path(path)) not in sys.path:
        sys.path.insert(0, str(Path(path)))
    try:
        import asmk
        from asmk import codebook, index, inverted_file, io_helpers, kernel
    except ImportError as exc:
        print(f"[asmk] reference package not importable ({exc}): comparison skipped; install it with "
              "`pip install --target DIR --no-deps asmk==0.1.1` and pass --asmk-path DIR", flush=True)
        return None
    try:
        version = metadata.version("asmk")
    except metadata.PackageNotFoundError:
        version = getattr(asmk, "__version__", "unknown")
    print(f"[asmk] reference package {version} from {Path(asmk.__file__).parent}", flush=True)
    return Reference(codebook, index, kernel, inverted_file, io_helpers, version)


def same_words(ref: Reference, centroids: np.ndarray, des: np.ndarray, words: np.ndarray, multiple: int) -> bool:
    """Whether the reference's own ``Codebook.quantize`` gives the words we feed both implementations."""
    return bool(np.array_equal(ref.codebook_of(centroids).quantize(des, multiple_assignment=multiple)[1], words))


def reference_nbytes(ivf: Any) -> tuple[int, int]:
    """(used, allocated) bytes of the reference IVF's arrays: posting vectors + image ids (int64) per word,
    trimmed to ``counts`` or as allocated (its lists grow by 1.5x), plus norm_factor / counts / idf."""
    used = alloc = int(np.asarray(ivf.norm_factor).nbytes + ivf.counts.nbytes + ivf.idf.nbytes)
    for v, ids, c in zip(ivf.ivf_vecs, ivf.ivf_image_ids, ivf.counts):
        if v is None:
            continue
        used += int(v[:c].nbytes + ids[:c].nbytes)
        alloc += int(v.nbytes + ids.nbytes)
    return used, alloc


def reference_asmk_star(ref: Reference, centroids: np.ndarray, db: tuple[np.ndarray, np.ndarray, np.ndarray],
                        q: tuple[np.ndarray, np.ndarray, np.ndarray], alpha: float
                        ) -> tuple[Callable[[], Any], Callable[[], tuple], dict]:
    """(build, query, state) callables of the reference's ASMK* on given words: build = its ``ASMKKernel.aggregate``
    + ``IVF.add`` (``IvfBuilder.add`` without ``Codebook.quantize``); query = its ``ASMKMethod.accumulate_scores``
    loop without ``Codebook.quantize``, returning (query ids, rankings, scores). ``db`` / ``q``: (descriptors,
    words, image ids)."""
    kern = ref.kernel.ASMKKernel(ref.codebook_of(centroids), binary=True)
    sim_params = {"alpha": alpha, "similarity_threshold": 0.0}
    state: dict = {}
    db_des, db_words, db_ids = db
    q_des, q_words, q_ids = q

    def build() -> Any:
        ivf = ref.inverted_file.IVF.initialize_empty(codebook_size=len(centroids), use_idf=False)
        ivf.add(*kern.aggregate(db_des, db_words, db_ids.copy()))
        state["ivf"] = ivf
        return ivf

    def similarity(*x):  # as in ASMKMethod.accumulate_scores
        return kern.similarity(*x, **sim_params)

    def query() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        acc = []
        for imid, seq in ref.io_helpers.slice_unique(q_ids):
            ades, words = kern.aggregate_image(q_des[seq], q_words[seq])
            ranks, scores = state["ivf"].search(ades, words, similarity_func=similarity, topk=None)
            acc.append((imid, ranks, scores))
        imids, ranks, scores = zip(*acc)
        return np.array(imids), np.vstack(ranks), np.vstack(scores)

    build()
    return build, query, state


__all__ = ["Reference", "import_reference", "same_words", "reference_nbytes", "reference_asmk_star"]
