"""Costs of learned keypoints and spatial verification on an indexed run, against references measured in the same run.

    python -m experiments.bench_sv --index runs/bench/index --dataset ../shared/data/museum-landmarks
        [--method regional:os_egm@full] [--queries 24] [--k 100] [--images 16] [--threads 2] [--json out.json]

Three figures, each printed as an absolute number and as a ratio to its in-run reference (this machine is shared,
so the ratios are the numbers to read; ``uptime`` is printed before and after):

1. **Extraction**: the run's keypoint extractor (``extract.keypoints``: extractor, side, top-N) per image against
   the run's CNN forward per image (every forward scale of ``extract``: the globals' scales and the locals' extra
   scales), image by image, interleaved, decoding excluded from both (the keypoint extractor's own resize
   included; the CNN gets its already resized inputs). Also against one forward at 512 and at 1,024 px, the
   demo's and the package default's ``extract.max_side``.
2. **Storage**: bytes of the run's committed ``keypoints`` files over the images that have keypoints (what the
   index really stores, Parquet with its encodings), and per keypoint; the reference is a sample of those files
   written again with the other descriptor type (float16 for an int8 run), same layout and writer.
3. **Verification** of one query's top ``K``, through the product's code (:class:`service.search.SearchService`,
   its :class:`service.verify.SpatialVerifier` reader and matcher, :func:`pipeline.verification`): reading the
   shortlist's keypoints from the table (per-shard reader, cold cache), matching, MAGSAC++; next to the
   first-stage search of the same query by ``--method`` and to the query's own encodings (CNN, keypoints).
"""
from __future__ import annotations

import argparse
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch

from experiments.bench_extract import network_inputs
from experiments.common import load_backbone, read_image, set_threads, write_json
from pipeline.extract import ExtractConfig
from pipeline.keypoints import build_keypoint_extractor
from pipeline.verification import guided_inlier_matches, match_positions, rescore_positions, verify_matches
from service.search import SearchService
from service.tracks import resolve_tracks
from storage.keypoint_weights import load_keypoint_weights
from storage.schemas import descriptor_array, descriptors_to_numpy, keypoints_schema
from storage.shard_writer import KEYPOINT_ROW_GROUP
from storage.tables import TableStore, parquet_bytes, read_parquet
from storage.uri import get_fs


def uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def sample_queries(dataset: str, n: int) -> list[tuple[str, str, tuple[float, float, float, float] | None]]:
    """``n`` queries spread evenly over the dataset's tracks: (track, image path, box or None)."""
    tracks = resolve_tracks(dataset, None)
    per = max(1, n // len(tracks))
    out = []
    for name, ds in tracks:
        step = max(1, len(ds.queries) // per)
        out += [(name, ds.query_path(i), ds.query_bbox(i)) for i in range(0, len(ds.queries), step)[:per]]
    return out


def database_paths(dataset: str, n: int) -> list[str]:
    """Every k-th database image of the first track: a fixed, varied sample."""
    _, ds = resolve_tracks(dataset, None)[0]
    step = max(1, len(ds.images) // n)
    return [ds.image_path(i) for i in range(0, len(ds.images), step)[:n]]


def time_extraction(cfg: ExtractConfig, paths: list[str], repeats: int) -> dict:
    """Keypoint extraction vs the CNN forward per image (see the module docstring), interleaved."""
    bb = load_backbone(cfg, "cpu")
    kp_cfg = cfg.keypoints.extractor_config(device="cpu")
    ex = build_keypoint_extractor(kp_cfg, "cpu", state_dict=load_keypoint_weights(cfg.keypoints.name))
    refs = {"run": cfg, "512": ExtractConfig(max_side=512, local_features=0),
            "1024": ExtractConfig(max_side=1024, local_features=0)}
    t = {k: [] for k in (*refs, "keypoints")}
    for p in paths:
        inputs = {k: network_inputs(Path(p), c) for k, c in refs.items()}
        rgb = np.asarray(read_image(p, cfg.keypoint_side or None).convert("RGB"))
        with torch.inference_mode():
            if p == paths[0]:  # warm-up
                bb(inputs["run"][0][None]), ex.extract(rgb)
            for _ in range(repeats):
                for k, xs in inputs.items():
                    t0 = time.perf_counter()
                    for x in xs:
                        bb(x[None])
                    t[k].append(time.perf_counter() - t0)
                t0 = time.perf_counter()
                ex.extract(rgb)
                t["keypoints"].append(time.perf_counter() - t0)
    # per-image cost over the sample = mean time (a ratio of totals: what it costs an index of such images);
    # medians alongside (a database of mostly small distractors has a small median image)
    mean = {k: float(np.mean(v)) for k, v in t.items()}
    med = {k: float(np.median(v)) for k, v in t.items()}
    scales = [f"{w}x{h}" for w, h in ((x.shape[2], x.shape[1]) for x in network_inputs(Path(paths[0]), cfg))]
    out = {"images": len(paths), "repeats": repeats, "mean_ms": {k: 1000 * v for k, v in mean.items()},
           "median_ms": {k: 1000 * v for k, v in med.items()},
           "keypoints": f"{kp_cfg.extractor} @{kp_cfg.max_side} px, top {kp_cfg.top_n}",
           "run_forward_inputs_first_image": scales,
           "ratio_to_run_forward": mean["keypoints"] / mean["run"],
           "ratio_to_512": mean["keypoints"] / mean["512"], "ratio_to_1024": mean["keypoints"] / mean["1024"],
           "median_ratio_to_run_forward": med["keypoints"] / med["run"]}
    print(f"\n[extraction] {len(paths)} images x {repeats}, mean per image: keypoints ({out['keypoints']}) "
          f"{1000 * mean['keypoints']:.0f} ms; the run's CNN forward ({' + '.join(scales)} on the first image) "
          f"{1000 * mean['run']:.0f} ms -> ratio {out['ratio_to_run_forward']:.2f} (medians "
          f"{1000 * med['keypoints']:.0f} / {1000 * med['run']:.0f} ms -> {out['median_ratio_to_run_forward']:.2f}); "
          f"one forward at 512 px "
          f"{1000 * mean['512']:.0f} ms -> {out['ratio_to_512']:.2f}; at 1,024 px {1000 * mean['1024']:.0f} ms -> "
          f"{out['ratio_to_1024']:.2f}  (target <= 0.5)")
    return out


def reencoded_bytes(files: list[str], dtype: str, sample: int = 8) -> dict:
    """The first ``sample`` committed keypoints files written again with ``dtype`` descriptors (``int8`` |
    ``float16``), the same columns, row groups and writer (:func:`storage.tables.parquet_bytes`), in memory:
    bytes as stored vs re-encoded."""
    import pyarrow as pa

    stored, other, images = 0, 0, set()
    for uri in files[:sample]:
        fs, path = get_fs(uri)
        stored += fs.size(path)
        t = read_parquet(uri)
        images.update(t.column("image_id").to_pylist())
        desc = descriptors_to_numpy(t.column("descriptor"))
        col = descriptor_array(desc, dtype)
        t = t.set_column(t.schema.get_field_index("descriptor"), pa.field("descriptor", col.type), col)
        t = t.replace_schema_metadata(keypoints_schema(desc.shape[1], dtype).metadata)
        other += len(parquet_bytes(t, row_group_size=KEYPOINT_ROW_GROUP))   # the writer of the tables
    n = max(1, len(images))
    return {"files": min(sample, len(files)), "images": len(images), "dtype": dtype,
            "stored_bytes_per_image": stored / n, "reencoded_bytes_per_image": other / n}


def measure_storage(root: str) -> dict:
    """The committed keypoints files of the run: bytes per image with keypoints and per keypoint; and a sample of
    them re-encoded with the other descriptor type (float16 <-> int8), the in-run reference of the int8 choice."""
    import pyarrow.parquet as pq

    files = TableStore(root).committed_files("keypoints")
    nbytes, rows, images = 0, 0, set()
    for uri in files:
        fs, path = get_fs(uri)
        nbytes += fs.size(path)
        with fs.open(path, "rb") as f:
            pf = pq.ParquetFile(f)
            rows += pf.metadata.num_rows
            images.update(pf.read(columns=["image_id"]).column("image_id").to_pylist())
            dtype = str(pf.schema_arrow.field("descriptor").type.value_type)
    n = max(1, len(images))
    out = {"files": len(files), "bytes": nbytes, "images": len(images), "keypoints": rows,
           "bytes_per_image": nbytes / n, "keypoints_per_image": rows / n, "bytes_per_keypoint": nbytes / max(1, rows),
           "descriptor_dtype": dtype if files else None}
    print(f"\n[storage] {len(files)} keypoints files, {len(images):,} images, {rows / n:.0f} keypoints per image "
          f"({dtype} descriptors): {nbytes / n / 1000:.1f} kB per image ({nbytes / n / 1024:.1f} KiB), "
          f"{nbytes / max(1, rows):.1f} B per keypoint  (target <= 80 KB)")
    if files:
        other = "float16" if dtype == "int8" else "int8"
        ref = reencoded_bytes(files, other)
        out["reencoded"] = ref
        print(f"[storage] the first {ref['files']} files ({ref['images']:,} images) re-encoded with {other} "
              f"descriptors: {ref['reencoded_bytes_per_image'] / 1000:.1f} kB per image against "
              f"{ref['stored_bytes_per_image'] / 1000:.1f} kB as stored ({dtype}): ratio stored / {other} "
              f"{ref['stored_bytes_per_image'] / max(ref['reencoded_bytes_per_image'], 1):.2f}")
    return out


def time_verification(service: SearchService, queries: list, method: str, k: int,
                      rescore: dict | None = None) -> dict:
    """Per query: encodings, first-stage search, then the top ``k`` verified (read, match, geometry), and with
    ``rescore`` (``verify.rescore_*`` keys without the prefix, e.g. ``{"matcher": "lighterglue", "top": 10}``) the
    learned matcher's re-verification of :func:`rescore_positions` (the cascade of ``+sv``)."""
    ver = service.verifier()
    if rescore:
        ver.cfg = replace(ver.cfg, **{f"rescore_{key}": v for key, v in rescore.items()})
    rescore = ver.cfg.rescore_matcher
    rescore_top = ver.cfg.rescore_top
    rows = []
    for track, path, box in queries:
        data = Path(path).read_bytes()
        t0 = time.perf_counter()
        q = service.encode(data, box)
        t_enc = time.perf_counter() - t0
        t0 = time.perf_counter()
        q = service.encoder.add_keypoints(q)
        t_qkp = time.perf_counter() - t0
        t0 = time.perf_counter()
        ranking = service.rank([q], method, depth=k)[0]
        t_first = time.perf_counter() - t0
        ids = list(ranking.image_ids[:k])
        ver._db.clear()
        t0 = time.perf_counter()
        db = ver.database_keypoints(ids)
        t_read = time.perf_counter() - t0
        qkp = q.keypoints
        dbs = [db[i] for i in ids if i in db]
        t0 = time.perf_counter()
        matches = ver.matcher.match_many(qkp, dbs)
        t_match = time.perf_counter() - t0
        t0 = time.perf_counter()
        res = [verify_matches(qkp, d, pairs, ver.cfg) for d, (pairs, _) in zip(dbs, matches)]
        t_geom = time.perf_counter() - t0
        t_rescore, n_rescore = 0.0, 0
        if rescore != "none":
            inl = np.array([r.inliers for r in res], np.float64)
            pos = rescore_positions(-np.arange(len(res), dtype=np.float64), inl, ver.cfg)
            t0 = time.perf_counter()
            for j in pos:   # as the product: MNN's inliers first among the keypoints the matcher sees
                anchor = match_positions(qkp, dbs[j], res[j].matches) if ver.cfg.rescore_guided else None
                guided_inlier_matches(qkp, [dbs[j]], [anchor], ver.cfg.rescore_keypoints, ver.cfg, ver.rescorer)
            t_rescore, n_rescore = time.perf_counter() - t0, len(pos)
        rows.append({"track": track, "query": Path(path).name, "shortlist": len(dbs), "query_keypoints": len(qkp),
                     "verified": int(sum(r.inliers >= ver.cfg.min_inliers for r in res)),
                     "encode_s": t_enc, "query_keypoints_s": t_qkp, "first_stage_s": t_first, "read_s": t_read,
                     "match_s": t_match, "geometry_s": t_geom, "verify_s": t_read + t_match + t_geom,
                     "rescore_pairs": n_rescore, "rescore_s": t_rescore,
                     "cascade_s": t_read + t_match + t_geom + t_rescore})
    keys = ("encode_s", "query_keypoints_s", "first_stage_s", "read_s", "match_s", "geometry_s", "verify_s",
            "rescore_s", "cascade_s", "rescore_pairs")
    med = {key: float(np.median([r[key] for r in rows])) for key in keys}
    mean = {key: float(np.mean([r[key] for r in rows])) for key in keys}
    out = {"method": method, "k": k, "queries": len(rows), "median_s": med, "mean_s": mean,
           "ratio_verify_to_first_stage": med["verify_s"] / max(med["first_stage_s"], 1e-9), "per_query": rows}
    print(f"\n[verify] {len(rows)} queries, top {k} of {method} (medians, s): query CNN encoding "
          f"{med['encode_s']:.3f}, query keypoints {med['query_keypoints_s']:.3f}, first-stage search "
          f"{med['first_stage_s']:.3f}; verification {med['verify_s']:.3f} = read {med['read_s']:.3f} + match "
          f"{med['match_s']:.3f} + MAGSAC {med['geometry_s']:.3f} (mean {mean['verify_s']:.3f}, max "
          f"{max(r['verify_s'] for r in rows):.3f}) = {out['ratio_verify_to_first_stage']:.1f}x the first stage  "
          f"(target <= 1.5 s)")
    if rescore != "none":
        print(f"[verify] with {rescore} re-verifying the first stage's and MNN's top {rescore_top} (median "
              f"{med['rescore_pairs']:.0f} pairs): {med['rescore_s']:.3f} s more, {med['cascade_s']:.3f} s in all "
              f"(mean {mean['cascade_s']:.3f}, max {max(r['cascade_s'] for r in rows):.3f}; "
              f"{1000 * sum(r['rescore_s'] for r in rows) / max(1, sum(r['rescore_pairs'] for r in rows)):.0f} ms "
              f"per {rescore} pair)")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--index", required=True, help="an index run with a keypoints table")
    p.add_argument("--dataset", required=True, help="dataset folder / gnd.json whose queries are timed")
    p.add_argument("--method", default="regional:os_egm@full", help="first-stage method")
    p.add_argument("--queries", type=int, default=24)
    p.add_argument("--k", type=int, default=100)
    p.add_argument("--images", type=int, default=16, help="database images for the extraction timing")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=2, help="torch / OpenCV threads (an actor's share)")
    p.add_argument("--skip", nargs="*", default=[], choices=("extraction", "storage", "verify"))
    p.add_argument("--rescore", default="none", choices=("none", "lighterglue", "lightglue"),
                   help="also time the learned re-verification (verify.rescore_matcher)")
    p.add_argument("--rescore-top", type=int, default=10)
    p.add_argument("--rescore-keypoints", type=int, default=0, help="verify.rescore_keypoints (0 = all)")
    p.add_argument("--rescore-depth-confidence", type=float, default=None, help="verify.rescore_depth_confidence")
    p.add_argument("--match-keypoints", type=int, default=None,
                   help="verify.matcher.max_keypoints: MNN sees at most this many keypoints per image (0 = all)")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    set_threads(args.threads)
    __import__("cv2").setNumThreads(args.threads)
    print(f"[load] before: {uptime()}")
    service = SearchService(args.index, device="cpu")
    if args.match_keypoints is not None:
        ver = service.verifier()
        ver.cfg = replace(ver.cfg, matcher=replace(ver.cfg.matcher, max_keypoints=args.match_keypoints))
    res: dict = {"args": vars(args), "uptime_before": uptime()}
    if "storage" not in args.skip:
        res["storage"] = measure_storage(args.index)
    if "extraction" not in args.skip:
        res["extraction"] = time_extraction(service.encoder.cfg.extract, database_paths(args.dataset, args.images),
                                            args.repeats)
    if "verify" not in args.skip:
        rescore = {} if args.rescore == "none" else {
            "matcher": args.rescore, "top": args.rescore_top, "keypoints": args.rescore_keypoints,
            "depth_confidence": args.rescore_depth_confidence}
        res["verify"] = time_verification(service, sample_queries(args.dataset, args.queries), args.method, args.k,
                                          rescore)
    res["uptime_after"] = uptime()
    print(f"\n[load] after: {res['uptime_after']}")
    write_json(args.json, res)


if __name__ == "__main__":
    main()
