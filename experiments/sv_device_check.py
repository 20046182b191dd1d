"""GPU check of the learned keypoints and matchers (run on a CUDA machine; not a product entry point).

For XFeat and ALIKED: keypoints on CUDA agree with CPU ones (same count, positions within 0.5 px,
descriptor cosine ~1), extraction time per image on the GPU (single and batched); for LighterGlue and LightGlue:
matches on CUDA agree with CPU ones and the time to verify a top-100 shortlist per query on the GPU.

    python experiments/sv_device_check.py --images <folder of .jpg> --json out.json
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.keypoints import KeypointConfig, build_keypoint_extractor  # noqa: E402
from pipeline.matching import MatcherConfig, build_matcher  # noqa: E402
from pipeline.verification import VerifyConfig, verify_shortlist  # noqa: E402
from storage.images import decode_image  # noqa: E402
from storage.keypoint_weights import load_keypoint_weights  # noqa: E402


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def agreement(a, b) -> dict:
    """Fraction of CPU keypoints with a CUDA keypoint within 0.5 px, and their descriptor cosine."""
    if len(a) == 0 or len(b) == 0:
        return {"n_cpu": len(a), "n_cuda": len(b), "matched": 0.0, "cos": float("nan")}
    d = np.linalg.norm(a.xy[:, None] - b.xy[None], axis=2)
    j = d.argmin(1)
    ok = d[np.arange(len(a)), j] < 0.5
    cos = np.einsum("ij,ij->i", a.descriptors[ok], b.descriptors[j[ok]])
    return {"n_cpu": len(a), "n_cuda": len(b), "matched": float(ok.mean()), "cos_min": float(cos.min()),
            "cos_mean": float(cos.mean())}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--images", required=True)
    p.add_argument("--json", default="")
    p.add_argument("--k", type=int, default=100)
    args = p.parse_args()
    dev = torch.device("cuda")
    out: dict = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
    print(out, flush=True)
    imgs = [np.asarray(decode_image(f.read_bytes())) for f in sorted(Path(args.images).glob("*.jpg"))]
    print(f"{len(imgs)} images", flush=True)
    kps: dict = {}
    for name, side in (("xfeat", 640), ("xfeat", 1024), ("aliked", 640), ("aliked", 1024)):
        cfg = KeypointConfig(extractor=name, max_side=side, top_n=1024)
        sd = load_keypoint_weights(name)
        cpu = build_keypoint_extractor(cfg, "cpu", state_dict=sd)
        gpu = build_keypoint_extractor(cfg, dev, state_dict=sd)
        agree = [agreement(cpu.extract(im), gpu.extract(im)) for im in imgs[:4]]
        for im in imgs[:2]:
            gpu.extract(im)  # warm-up
        sync()
        t = time.perf_counter()
        res = [gpu.extract(im) for im in imgs]
        sync()
        single = (time.perf_counter() - t) / len(imgs)
        same = [imgs[0]] * 16
        gpu.extract_batch(same)
        sync()
        t = time.perf_counter()
        gpu.extract_batch(same)
        sync()
        batched = (time.perf_counter() - t) / 16
        kps[(name, side)] = res
        r = {"agreement": agree, "ms_per_image_single": 1000 * single, "ms_per_image_batch16": 1000 * batched,
             "keypoints_mean": float(np.mean([len(k) for k in res]))}
        out[f"{name}@{side}"] = r
        print(name, side, json.dumps(r), flush=True)
    for mname, ext in (("lighterglue", "xfeat"), ("lightglue", "aliked"), ("mnn", "xfeat")):
        mcfg = MatcherConfig(name=mname)
        sd = None if mname == "mnn" else load_keypoint_weights(mname)
        m_cpu = build_matcher(mcfg, "cpu", sd)
        m_gpu = build_matcher(mcfg, dev, sd)
        ks = kps[(ext, 640)]
        jac = []
        for a, b in ((ks[0], ks[1]), (ks[2], ks[3])):
            pc, _ = m_cpu.match(a, b)
            pg, _ = m_gpu.match(a, b)
            sc, sg = {tuple(x) for x in pc.tolist()}, {tuple(x) for x in pg.tolist()}
            jac.append(len(sc & sg) / max(1, len(sc | sg)))
        vcfg = VerifyConfig(matcher=mcfg, min_inliers=15)
        shortlist = [ks[i % len(ks)] for i in range(1, args.k + 1)]
        verify_shortlist(ks[0], shortlist[:5], vcfg, m_gpu)
        sync()
        t = time.perf_counter()
        res = verify_shortlist(ks[0], shortlist, vcfg, m_gpu)
        sync()
        dt = time.perf_counter() - t
        r = {"jaccard_cpu_vs_cuda": jac, "s_per_query_top_k": dt, "k": args.k,
             "inliers_first5": [x.inliers for x in res[:5]]}
        out[mname] = r
        print(mname, json.dumps(r), flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
