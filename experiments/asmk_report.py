"""Printed tables of ``experiments.bench_asmk``: one per track, and the summary over the tracks."""
from __future__ import annotations

import argparse


def fmt_bytes(n: float) -> str:
    return f"{n / 2**20:.1f} MiB"


def _mh(m: dict) -> str:
    return f"{m['medium']:5.2f}/{m['hard']:5.2f}"


def _line(name: str, m: dict, nbytes: float, rel: float, b: float | None, q: float | None, width: int = 58) -> None:
    bs = f"{b:8.2f}" if b is not None else f"{'':8s}"
    qs = f"{q:8.2f}" if q is not None else f"{'':8s}"
    print(f"{name:{width}s} {m['easy']:6.2f} {m['medium']:7.2f} {m['hard']:6.2f} {fmt_bytes(nbytes):>10s} "
          f"{rel:7.2f} {bs} {qs}")


def _print_parity(args: argparse.Namespace, res: dict, tol: float, goal: float) -> None:
    p, s, r = res["parity"], res["speedup"], res["reference"]
    dm = p["map_diff"]
    print(f"|ours - asmk| ASMK* mAP: Easy {abs(dm['easy']):.3f}  Medium {abs(dm['medium']):.3f}  Hard "
          f"{abs(dm['hard']):.3f} -> {'OK' if p['ok'] else 'FAIL'} (<= {tol})   max |score diff| "
          f"{p['max_abs_score_diff']:.1e}, identical top-10 lists {100 * p['same_top10_fraction']:.1f}%")
    print(f"speed-up ours vs asmk (same words, {args.threads} thread(s), best of {args.repeats}): build "
          f"x{s['build']:.1f}  query x{s['query']:.1f}  -> {'OK' if min(s.values()) >= goal else 'FAIL'} "
          f"(>= x{goal:.0f})")
    print(f"FAISS quantisation of the queries (same call for both, not in these times): "
          f"{res['quantize_queries_s']:.2f}s; the reference's Codebook.quantize gives the same words: "
          f"{res['same_query_words_as_reference_quantize']}")
    print(f"reference index bytes: {fmt_bytes(r['nbytes'])} used (int64 image ids), "
          f"{fmt_bytes(r['nbytes_allocated'])} allocated; same number of (image, word) vectors: "
          f"{r['nnz'] == res['ours']['nnz']}")


def print_track(args: argparse.Namespace, res: dict, tol: float, goal: float) -> None:
    """mAP, size and timings of every method on one track, then the parity lines (with the reference)."""
    hdr = (f"{'method':58s} {'Easy':>6s} {'Medium':>7s} {'Hard':>6s} {'db bytes':>10s} {'/ASMK*':>7s} "
           f"{'build s':>8s} {'query s':>8s}")
    print(hdr)
    print("-" * len(hdr))
    base = res["ours"]["nbytes"]
    if "reference" in res:
        r = res["reference"]
        _line("ASMK* (asmk reference)", r["map"], r["nbytes"], r["nbytes"] / base, r["build_s"], r["query_s"])
    for v in res["variants"]:
        timed = v.get("timed", False)
        _line(v["method"] + (" (ours)" if timed else ""), v["map"], v["nbytes"], v["size_rel"],
              v["build_s"] if timed else None, v["query_s"] if timed else None)
    if "reference" in res:
        _print_parity(args, res, tol, goal)
    print("(the other kernels' build and query times are single untimed runs, in the JSON)", flush=True)


def _find(variants: list[dict], kernel: str, source: str) -> dict | None:
    return next((v for v in variants if v["kernel"] == kernel and v["source"] == source and v["pooling"] == "max"),
                None)


def print_summary(args: argparse.Namespace, results: list[dict], source: str) -> None:
    """One line per track: reference vs ours ASMK*, D2R-ASMK* and R-ASMK* over ``source``, speed-ups."""
    print("\n=== summary: mAP Medium / Hard; database size relative to our ASMK*; times: best of "
          f"{args.repeats}, {args.threads} thread(s), same words for both")
    hdr = (f"{'track':10s} {'asmk ASMK*':>13s} {'ours ASMK*':>13s} {'|diff| M/H':>12s} {'D2R-ASMK* max':>19s} "
           f"{'R-ASMK*':>19s} {'build asmk/ours s':>19s} {'x':>5s} {'query asmk/ours s':>19s} {'x':>5s}")
    print(hdr)
    print("-" * len(hdr))
    for r in results:
        if "reference" in r:
            rf, dm, s = r["reference"], r["parity"]["map_diff"], r["speedup"]
            ref_s, dif = _mh(rf["map"]), f"{abs(dm['medium']):.2f}/{abs(dm['hard']):.2f}"
            bt = f"{rf['build_s']:.2f}/{r['ours']['build_s']:.2f}"
            qt = f"{rf['query_s']:.2f}/{r['ours']['query_s']:.2f}"
            bx, qx = f"{s['build']:.1f}", f"{s['query']:.1f}"
        else:
            ref_s = dif = bt = qt = bx = qx = "-"
        cols = []
        for kernel in ("d2r_asmk_star", "r_asmk_star"):
            v = _find(r["variants"], kernel, source)
            cols.append(f"{_mh(v['map'])} {v['size_rel']:.2f}x" if v else "-")
        print(f"{r['track']:10s} {ref_s:>13s} {_mh(r['ours']['map']):>13s} {dif:>12s} {cols[0]:>19s} "
              f"{cols[1]:>19s} {bt:>19s} {bx:>5s} {qt:>19s} {qx:>5s}")


__all__ = ["print_track", "print_summary", "fmt_bytes"]
