"""Retrieval benchmark: index a dataset, encode its queries, rank with every method, evaluate, report.

    python -m jobs.benchmark --dataset <gnd.json | gnd_*.pkl | dataset folder | roxford5k | rparis6k>
        [--data-root DIR] --out DIR [--tracks root,in-photos,no-box] [--methods gem,regional:fs_egm,...]
        [--distractors N | LIST_URI] [--synthetic-distractors 0,10000,100000] [--max-side 512]
        [--limit-queries N] [--examples 4] [--reuse]
    python -m jobs.benchmark --render report.json --out DIR     (re-render a report's HTML)

1. **Tracks** (``service.tracks``): a folder with ``gnd.json`` and sub-folders with their own (museum-landmarks:
   ``root``, ``in-photos``, ``no-box``), a single ground-truth file, or ``roxford5k`` / ``rparis6k``.
2. **Index**: the union of the tracks' databases is listed in ``<out>/index_images.txt`` and indexed once by
   ``jobs.index`` (every stage, ``configs/benchmark.yaml`` by default) into ``<out>/index``; a rerun resumes,
   ``--reuse`` skips a complete index.
3. **Queries** are encoded once by the run's own encoder, cropped to their ``bbx`` (cached with ``--reuse``).
4. **Methods** (``--methods``; default every one the index published): global methods and their ``+aqe`` /
   ``+diffusion`` re-rankings, ``regional:<source>[@full]``, ASMK kernels and, with a trained query-region scorer
   (``--scorer``, default the run's own from ``jobs.train_query_scorer``), ``patches[:k]`` (seed 000; its
   queries are also encoded with their patches). When the run has keypoints, every method also gets a ``+sv``
   row (spatial verification of its top 100; ``--no-sv`` leaves them out): the shortlists of all methods are
   verified first as Ray tasks (one query stays in process) into one per-(query, image) inlier cache that every
   ``+sv`` ranking then reads. Each is ranked through
   :class:`service.search.SearchService` -- the code ``jobs.search`` runs -- restricted to the track's database.
5. **Evaluation** (Revisited-Oxford Easy/Medium/Hard mAP, mP@k), ``<out>/report.json``,
   ``<out>/rankings/<track>.npz`` and ``<out>/report.html`` (tables, PR curves, example rankings with the
   best-matching region boxes, query saliency maps).
6. **Distractors**: ``--synthetic-distractors`` appends generated descriptors near the real data
   (``pipeline.distractors``) to the global and regional indexes of every track; ``--distractors N`` appends
   the first N real R1M images (revisitop datasets) or the images of a list file, indexed with the database.
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from actors.common import init_ray
from actors.verify import verify_many
from jobs.index import index, setup_logging
from pipeline.config import STAGES, load_config
from pipeline.query_patches import proposal_tag
from service.benchmark import (FULL_RANK_MAX, Benchmark, Result, add_examples, clean, default_methods,
                               encode_queries, evaluate_track, print_table, synthetic_summary)
from service.errors import UserError, run_cli
from service.report import render_report
from service.search import MethodSpec, SearchService, is_sv, parse_method, rerank_name, sv_base
from service.verify import query_key as sv_query_key
from service.tracks import Track, add_real_distractors, canonical, query_key, resolve_tracks, union_paths
from storage.arrays import save_json
from storage.readers import image_uris
from storage.run import NotAnIndexError, RunManifest, load_run_config, read_corpus_manifest
from storage.uri import read_bytes

log = logging.getLogger("benchmark")
DEFAULT_CONFIG = Path(__file__).resolve().parents[1] / "configs" / "benchmark.yaml"
QUERY_EGM_NOTE = {
    "box": "Queries with a box use the box itself as their FS.EGM / OS.EGM region, as seed 001 does "
           "(--query-egm box); queries without a box detect their regions in the whole photo.",
    "detect": "Queries with a box detect their FS.EGM / OS.EGM regions inside the box (--query-egm detect); "
              "queries without a box detect them in the whole photo."}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m jobs.benchmark", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", help="gnd.json / gnd_*.pkl, a dataset folder, roxford5k or rparis6k")
    p.add_argument("--render", default=None, metavar="REPORT_JSON", help="only render this report's HTML into --out")
    p.add_argument("--data-root", default=None, help="folder of the download job's layout (revisitop names, R1M)")
    p.add_argument("--out", required=True, help="output folder (report.json, report.html, index/, rankings/)")
    p.add_argument("--tracks", default=None, help="comma-separated track names (default: all)")
    p.add_argument("--methods", nargs="*", default=None, help="method names, space or comma separated")
    p.add_argument("--distractors", default=None, help="N (R1M images) or the URI of a distractor list")
    p.add_argument("--synthetic-distractors", default=None, help="comma-separated N, e.g. 0,10000,100000")
    p.add_argument("--synthetic-methods", default=None,
                   help="methods run with synthetic distractors (default: every global and regional method)")
    p.add_argument("--max-side", type=int, default=512)
    p.add_argument("--query-egm", choices=("box", "detect"), default="box",
                   help="FS/OS.EGM regions of a query given with a box: the box as is (seed 001) or EGM inside it")
    p.add_argument("--limit-queries", type=int, default=None, help="first N queries of each track")
    p.add_argument("--examples", type=int, default=4, help="example queries per track in the HTML report")
    p.add_argument("--reuse", action="store_true", help="reuse a complete index and cached query encodings")
    p.add_argument("--config", default=str(DEFAULT_CONFIG), help="index config (YAML; default configs/benchmark.yaml)")
    p.add_argument("--index-set", action="append", default=[], metavar="KEY=VALUE",
                   help="override an index config key (as jobs.index --set)")
    p.add_argument("--topk", type=int, default=0, help=f"ranking depth (0: whole database up to {FULL_RANK_MAX:,})")
    p.add_argument("--num-cpus", type=int, default=None, help="CPUs of the local Ray the index job starts")
    p.add_argument("--ray-address", default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--scorer", default=None,
                   help="query-region scorer folder for patches[:k] (default: the index run's own, if trained)")
    p.add_argument("--no-sv", action="store_true",
                   help="no +sv (spatial verification) row per method, even when the run has keypoints")
    p.add_argument("-v", "--verbose", action="store_true")
    args = p.parse_args(argv)
    if not args.render and not args.dataset:
        p.error("--dataset is required (or --render REPORT_JSON)")
    return args


def _split(values: Sequence[str] | None) -> list[str]:
    return [v.strip() for x in (values or []) for v in x.split(",") if v.strip()]


def build_tracks(args: argparse.Namespace, notes: list[str]) -> list[Track]:
    """The tracks to evaluate (``--tracks``, ``--limit-queries``, real distractors)."""
    pairs = resolve_tracks(args.dataset, args.data_root)
    if args.tracks:
        wanted = _split([args.tracks])
        unknown = sorted(set(wanted) - {n for n, _ in pairs})
        if unknown:
            raise UserError(f"unknown tracks {unknown}; available: {[n for n, _ in pairs]}")
        pairs = [(n, d) for n, d in pairs if n in wanted]
    nq = (lambda d: d.n_queries) if args.limit_queries is None else (lambda d: min(d.n_queries, args.limit_queries))
    return add_real_distractors([Track(n, d, np.arange(nq(d))) for n, d in pairs], args.distractors, args.data_root,
                                notes)


def stages_left(index_root: str) -> list[str] | None:
    """The stages of the run at ``index_root`` that are not done, judged against the stages *it* was built with
    (its saved config: an index built without ASMK is complete without it); None when there is no run there."""
    try:
        planned = load_run_config(index_root).get("stages") or list(STAGES)
    except NotAnIndexError:
        return None
    manifest = RunManifest(index_root)
    return [s for s in planned if not manifest.all_done([s])]


def run_index(args: argparse.Namespace, list_uri: str, index_root: str) -> None:
    """Index the union list with ``jobs.index`` (every stage), unless ``--reuse`` finds it complete.

    ``--reuse`` without ``--index-set`` takes a complete index as it was built, whatever config built it (indexing
    it again with the default config would redo every stage whose parameters differ); with ``--index-set`` the
    index is brought up to that config (stages with unchanged parameters are kept)."""
    left = stages_left(index_root) if args.reuse and not args.index_set else None
    if left == []:
        log.info("index %s is complete: reused as built", index_root)
        return
    if left:
        log.info("index %s: stages %s are not done: indexing with %s", index_root, ",".join(left),
                 args.config)
    import ray
    import yaml

    overrides: dict[str, Any] = {"images": list_uri, "out": index_root, "limit": None, "stages": list(STAGES),
                                 "extract.max_side": int(args.max_side),
                                 # the list is exactly what to index: no demo subset patterns from the config
                                 "include": [], "exclude": []}
    for key, val in (("ray.num_cpus", args.num_cpus), ("ray.address", args.ray_address)):
        if val is not None:
            overrides[key] = val
    for item in args.index_set:
        key, _, val = item.partition("=")
        overrides[key.strip()] = yaml.safe_load(val)
    cfg = load_config(args.config, {**overrides, "stages": [s for s in STAGES if s != "asmk"]})
    if cfg.extract.n_locals > 0 or cfg.asmk.locals != "cnn":  # the ASMK family needs local features (or keypoints)
        cfg = load_config(args.config, overrides)
    was_up = ray.is_initialized()
    index(cfg)
    if not was_up and ray.is_initialized():
        ray.shutdown()  # frees the workers' memory and cores for query encoding


def choose_methods(args: argparse.Namespace, service: SearchService, notes: list[str]) -> list[MethodSpec]:
    """``--methods`` (or every method the index published) that this index can answer, each followed by its
    ``+sv`` row when the run has keypoints (unless ``--no-sv``)."""
    available = service.available_methods()
    names = _split(args.methods) or default_methods(available, service.diffusion_methods())
    if not args.no_sv and service.encoder.keypoints_available:
        names = [x for n in names for x in ([n] if is_sv(n) else [n, f"{n}+sv"])]
        notes.append("+sv: spatial verification of each method's top 100 (extract.keypoints of the run, verify.* "
                     "of its config: MNN matches, MAGSAC homography with an affine fallback, tiered fusion).")
    specs = []
    for n in dict.fromkeys(names):
        parse_method(n)  # an unknown name is an error, not a skipped method
        try:
            specs.append(service.spec(n))
        except UserError as exc:
            notes.append(f"{n}: not available in this index run, skipped ({exc}).")
            log.warning("%s: not available in this index run, skipped (%s)", n, exc)
    return specs


def query_items(tracks: Sequence[Track]) -> tuple[dict[str, tuple[str, Any]], dict[str, list[str]]]:
    """Distinct (path, box) queries by cache key, and each track's query keys in order."""
    items: dict[str, tuple[str, Any]] = {}
    qkeys: dict[str, list[str]] = {}
    for t in tracks:
        ks = []
        for i in t.query_idx:
            path, bbox = t.dataset.query_path(int(i)), t.dataset.query_bbox(int(i))
            k = query_key(path, bbox)
            items[k] = (path, bbox)
            ks.append(k)
        qkeys[t.name] = ks
    return items, qkeys


def add_synthetic_tracks(args: argparse.Namespace, tracks: list[Track], qkeys: dict[str, list[str]]) -> list[int]:
    """Derived ``<track>+<N> synth`` tracks for every base track and N of ``--synthetic-distractors``."""
    synth_ns = sorted({int(v) for v in _split([args.synthetic_distractors])}) if args.synthetic_distractors else []
    for t in [t for t in tracks if t.base is None]:
        for n in synth_ns:
            if n > 0:
                tracks.append(Track(f"{t.name}+{n} synth", t.dataset, t.query_idx, t.db_union, base=t.name,
                                    synthetic=n))
                qkeys[tracks[-1].name] = qkeys[t.name]
    return synth_ns


def prefetch_verification(args: argparse.Namespace, bench: Benchmark, results: dict[str, dict[str, Result]],
                          specs: Sequence[MethodSpec]) -> dict[str, Any]:
    """Verify the union of every ``+sv`` method's shortlists (taken from its base method's results) as Ray tasks,
    into the service's inlier cache, so the ``+sv`` rankings that follow only read it."""
    verifier = bench.service.verifier()
    queries, shortlists = {}, {}
    for spec in specs:
        base, k = sv_base(spec.name), rerank_name(spec.reranks[-1])[1] or verifier.cfg.shortlist
        for t in [t for t in bench.tracks if not t.synthetic and base in results[t.name]]:
            ids = bench.track_ids(t)
            for qi, qk in enumerate(bench.qkeys[t.name]):
                q = bench.qdesc[qk]
                key = sv_query_key(q)
                queries[key] = (q.kp_xy, q.kp_scores, q.kp_desc, tuple(int(v) for v in q.image_size))
                todo = [ids[j] for j in results[t.name][base].ids[qi, :k] if 0 <= j < t.n_db and ids[j]]
                shortlists.setdefault(key, []).extend(i for i in todo if (key, i) not in verifier.pairs)
    if len(shortlists) > 1:
        init_ray(args.ray_address, args.num_cpus)
    pairs, info = verify_many(bench.service.root, verifier.cfg, queries, shortlists)
    verifier.add_pairs(pairs)
    print(f"[verify] {info['pairs']:,} (query, image) pairs in {info['seconds']:.1f} s ({info['tasks']} Ray tasks)",
          flush=True)
    if verifier.cfg.rescore_matcher != "none":
        info["rescore"] = prefetch_rescore(bench, results, specs, queries)
    return info


def prefetch_rescore(bench: Benchmark, results: dict[str, dict[str, Result]], specs: Sequence[MethodSpec],
                     queries: dict[str, Any]) -> dict[str, Any]:
    """The learned matcher's re-verification (``verify.rescore_matcher``) of every ``+sv`` method's targets, as Ray
    tasks into the verifier's second cache: the MNN results are cached by now, so the targets are known. Only a
    warm-up: whatever it misses, the re-ranking verifies in process."""
    verifier = bench.service.verifier()
    targets: dict[str, list[str]] = {}
    for spec in specs:
        base, k = sv_base(spec.name), rerank_name(spec.reranks[-1])[1] or verifier.cfg.shortlist
        for t in [t for t in bench.tracks if not t.synthetic and base in results[t.name]]:
            ids, res = bench.track_ids(t), results[t.name][base]
            for qi, qk in enumerate(bench.qkeys[t.name]):
                key = sv_query_key(bench.qdesc[qk])
                keep = [r for r, j in enumerate(res.ids[qi, :k]) if 0 <= j < t.n_db and ids[j]]
                short = [ids[res.ids[qi, r]] for r in keep]
                if not short or any((key, i) not in verifier.pairs for i in short):
                    continue
                todo = verifier.rescore_targets(key, short, res.scores[qi, keep])
                targets.setdefault(key, []).extend(i for i in todo if (key, i) not in verifier.rescored)
    cfg = replace(verifier.cfg, matcher=verifier.cfg.rescorer_config())
    anchors = {(k, i): a for k, ids in targets.items() for i, a in zip(ids, verifier.rescore_anchors(k, ids))
               if a is not None}
    pairs, info = verify_many(bench.service.root, cfg, queries, targets, anchors=anchors)
    verifier.rescored.update(pairs)
    print(f"[verify] {info['pairs']:,} pairs re-verified with {cfg.matcher.name} in {info['seconds']:.1f} s "
          f"({info['tasks']} Ray tasks)", flush=True)
    return info


def run_methods(args: argparse.Namespace, bench: Benchmark, specs: Sequence[MethodSpec]
                ) -> dict[str, dict[str, Result]]:
    """Every (method, track) ranking, ``+sv`` methods last (after their shortlists were verified as Ray tasks);
    synthetic tracks get the global and regional methods only, without ``+sv``."""
    synth_methods = set(_split([args.synthetic_methods])) if args.synthetic_methods else None
    results: dict[str, dict[str, Result]] = {t.name: {} for t in bench.tracks}
    sv = [s for s in specs if is_sv(s.name)]
    for spec in [s for s in specs if not is_sv(s.name)] + sv:
        if sv and spec is sv[0]:
            bench.verify_info = prefetch_verification(args, bench, results, sv)
        for t in bench.tracks:
            skip = spec.family == "asmk" or is_sv(spec.name) or (synth_methods is not None
                                                                 and spec.name not in synth_methods)
            if t.synthetic and skip:
                continue
            r = results[t.name][spec.name] = bench.run(t, spec)
            print(f"[search] {t.name:<22} {spec.name:<24} {r.query_seconds:7.2f} s", flush=True)
    return results


def build_seconds(index_root: str) -> dict[str, float]:
    """Build time of every published index (from the faiss / asmk stages' results)."""
    out: dict[str, float] = {}
    run = RunManifest(index_root)
    for stage in ("faiss", "asmk"):
        for name, res in ((run.stage(stage) or {}).get("result") or {}).items():
            if isinstance(res, dict) and "seconds" in res:
                out[name] = float(res["seconds"])
    return out


def index_summary(index_root: str, args: argparse.Namespace, wall: float, n_listed: int, n_indexed: int
                  ) -> dict[str, Any]:
    run = RunManifest(index_root).data.get("stages", {})
    stages = {s: {"seconds": float(e.get("seconds", 0.0)), "peak_rss_bytes": e.get("peak_rss_bytes")}
              for s, e in run.items()}
    res = (run.get("extract") or {}).get("result", {})
    return {"root": index_root, "stages": stages, "seconds": float(sum(v["seconds"] for v in stages.values())),
            "images": res.get("images"), "errors": res.get("errors"), "wall_seconds_this_run": wall,
            "images_listed": n_listed, "images_indexed": n_indexed, "max_side": args.max_side,
            "config": args.config, "sets": args.index_set}


def write_report(args: argparse.Namespace, out: Path, report: dict[str, Any]) -> None:
    save_json(str(out / "report.json"), clean(report))
    html = render_report(clean(report), out)
    print_table(clean(report))
    print(f"\n[benchmark] report: {out / 'report.json'}  {html}", flush=True)


def evaluate(args: argparse.Namespace, out: Path, bench: Benchmark, results: dict[str, dict[str, Result]],
             specs: Sequence[MethodSpec], synth_ns: list[int], items: dict[str, tuple[str, Any]],
             report: dict[str, Any]) -> None:
    """Per-track evaluation, distractor summary and examples into ``report``."""
    rank_dir = out / "rankings"
    rank_dir.mkdir(exist_ok=True)
    indexed = set(image_uris(bench.service.root))
    for t in bench.tracks:
        tr = evaluate_track(t, results[t.name], rank_dir)
        tr["missing_db_images"] = int(sum(i is None or i not in indexed for i in bench.track_ids(t)))
        report["tracks"][t.name] = tr
    base_tracks = [t for t in bench.tracks if t.base is None]
    if bench.verify_info:
        report["verification"] = {**bench.verify_info, "pairs_cached": len(bench.service.verifier().pairs)}
    if synth_ns:
        report["distractors"] = {"synthetic": synthetic_summary(report, base_tracks, specs, synth_ns),
                                 "noise": bench.noise_info}
        report["notes"].append("Synthetic distractors (global and regional methods only): mixtures of two real "
                               "negatives + per-dimension noise calibrated to the real nearest-neighbour cosine; "
                               "see report['distractors']['noise'].")
    for t in base_tracks:
        add_examples(report["tracks"][t.name], t, results[t.name], bench, items, args.examples, out)


def run(args: argparse.Namespace) -> int:
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    index_root, notes = str(out / "index"), []
    tracks = build_tracks(args, notes)
    paths = union_paths(tracks)
    list_uri = out / "index_images.txt"
    text = "".join(p + "\n" for p in paths)
    if not list_uri.exists() or list_uri.read_text() != text:
        list_uri.write_text(text)
    print(f"[benchmark] {len(tracks)} tracks, {len(paths):,} database images to index", flush=True)
    t0 = time.time()
    run_index(args, str(list_uri), index_root)
    index_wall = time.time() - t0
    manifest = read_corpus_manifest(index_root, columns=["image_id", "uri"])
    u2i = dict(zip(manifest.column("uri").to_pylist(), manifest.column("image_id").to_pylist()))
    union_ids = [u2i.get(p) for p in paths]
    pos = {p: i for i, p in enumerate(paths)}
    for t in tracks:
        t.db_union = np.array([pos[canonical(p)] for p in t.dataset.image_paths()], np.int64)
    service = SearchService(index_root, query_egm=args.query_egm, scorer=args.scorer)
    notes.append(QUERY_EGM_NOTE[args.query_egm])
    specs = choose_methods(args, service, notes)
    items, qkeys = query_items(tracks)
    print(f"[queries] {len(items)} distinct queries to encode", flush=True)
    patches = any(s.family == "patches" for s in specs)
    version = f"{(RunManifest(index_root).stage('descriptors') or {}).get('output_version', 'x')}-{args.query_egm}"
    if patches:  # encodings with patches live apart: they depend on the scorer's proposals
        version += f"-patches-{proposal_tag(service.patch_search().cfg.proposals)}"
    # query keypoints: for +sv, and as the query's locals of an ASMK built over learned keypoints (asmk.locals)
    keypoints = any(is_sv(s.name) for s in specs) or (
        service.encoder.cfg.asmk.locals != "cnn" and any(s.family == "asmk" for s in specs))
    qdesc, encode_s = encode_queries(service, items, str(out / "queries" / "cache" / version), args.reuse,
                                     patches=patches, keypoints=keypoints)
    synth_ns = add_synthetic_tracks(args, tracks, qkeys)
    bench = Benchmark(service, tracks, union_ids, qdesc, qkeys, args.topk, args.seed, build_seconds(index_root))
    results = run_methods(args, bench, specs)
    report: dict[str, Any] = {
        "dataset": tracks[0].dataset.name if len({t.dataset.name for t in tracks}) == 1 else args.dataset,
        "title": f"Retrieval benchmark: {Path(args.dataset).name}", "notes": notes,
        "index": index_summary(index_root, args, index_wall, len(paths), sum(i is not None for i in union_ids)),
        "queries": {"distinct": len(items), "encode_seconds": encode_s,
                    "seconds_per_query": encode_s / max(1, len(items))},
        "methods": [s.name for s in specs], "query_egm": args.query_egm, "tracks": {}}
    if patches:
        report["query_scorer"] = service.patch_search().describe()
        report["notes"] += scorer_overlap_notes(service.patch_search().info.get("queries", []), tracks)
    evaluate(args, out, bench, results, specs, synth_ns, items, report)
    write_report(args, out, report)
    return 0


def scorer_overlap_notes(trained_on: Sequence[str], tracks: Sequence[Track]) -> list[str]:
    """One note per track whose query photos the ``patches`` scorer was trained on: those rows are optimistic."""
    seen, out = set(trained_on), []
    for t in tracks:
        names = [t.dataset.queries[int(i)] for i in t.query_idx]
        n = sum(q in seen for q in names)
        if n:
            out.append(f"patches on {t.name}: {n} of its {len(names)} query photos were training queries of the "
                       "scorer, so the row is optimistic (held-out numbers: the scorer's cv_map, or "
                       "experiments/patches_nobox_cv.py for no-box).")
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    setup_logging(args.verbose)
    if args.render:
        import json

        return run_cli(lambda: print(render_report(json.loads(read_bytes(args.render)), args.out)) or 0,
                       args.verbose, "jobs.benchmark")
    return run_cli(lambda: run(args), args.verbose, "jobs.benchmark")


if __name__ == "__main__":
    sys.exit(main())
