"""Revisited-protocol evaluation: hand-computed APs / P@k and an independent loop implementation."""
from __future__ import annotations

import math

import numpy as np
import pytest

from pipeline.evaluation import (
    compute_ap,
    compute_map,
    evaluate_all,
    mean_pr_curve,
    precision_recall_curve,
    protocol_gnd,
)


def _one(ranking, ok, junk=(), kappas=(1, 5, 10)):
    m, aps, mpr, prs = compute_map([np.asarray(ranking)], [{"ok": list(ok), "junk": list(junk)}], kappas)
    return m, aps[0], mpr, prs[0]


# ---------------------------------------------------------------- hand-computed cases
def test_perfect_ranking_ap_is_one():
    m, ap, mpr, _ = _one([3, 7, 1, 2, 0], ok=[7, 3])
    assert ap == pytest.approx(1.0) and m == pytest.approx(1.0)
    # reference P@k: kq = min(k, last positive position = 2) -> 1/1, 2/2, 2/2
    np.testing.assert_allclose(mpr, [1.0, 1.0, 1.0])


def test_positives_at_ranks_0_and_2():
    # j=0, r=0: (1 + 1)/2 = 1 ; j=1, r=2: (1/2 + 2/3)/2 = 7/12 ; AP = (1 + 7/12) / 2 = 19/24
    assert compute_ap([0, 2], 2) == pytest.approx(19 / 24)
    _, ap, _, prs = _one([5, 9, 6, 8], ok=[5, 6])
    assert ap == pytest.approx(19 / 24)
    # positions (1-based) 1, 3: P@1 = 1/1, P@5 -> kq = 3 -> 2/3, P@10 -> 2/3
    np.testing.assert_allclose(prs, [1.0, 2 / 3, 2 / 3])


def test_compute_ap_single_positive_and_missing_ones():
    # one positive at 0-based rank 3 out of 1: (3/3 ... ) j=0: P0 = 0/3, P1 = 1/4 -> AP = 1/8
    assert compute_ap([3], 1) == pytest.approx(1 / 8)
    # the same hit but 4 positives: the three missing recall steps contribute nothing
    assert compute_ap([3], 4) == pytest.approx(1 / 32)
    assert compute_ap([], 3) == 0.0
    with pytest.raises(ValueError):
        compute_ap([0], 0)


def test_junk_between_positives_is_removed():
    _, ap, _, _ = _one([1, 50, 2], ok=[1, 2], junk=[50])
    assert ap == pytest.approx(1.0)
    # junk before a negative before a positive: raw position 3 -> junk-free 2 -> 19/24
    _, ap, _, _ = _one([1, 50, 60, 2], ok=[1, 2], junk=[50])
    assert ap == pytest.approx(19 / 24)
    # junk at the very top shifts everything up
    _, ap, _, _ = _one([50, 51, 1, 2], ok=[1, 2], junk=[51, 50])
    assert ap == pytest.approx(1.0)


def test_query_without_positives_is_skipped():
    ranks = np.array([[0, 0], [1, 1], [2, 2]])  # (n_db, n_q)
    gnd = [{"ok": [0], "junk": []}, {"ok": [], "junk": [1]}]
    m, aps, mpr, prs = compute_map(ranks, gnd, kappas=[1, 5])
    assert m == pytest.approx(1.0)
    assert aps[0] == pytest.approx(1.0) and math.isnan(aps[1])
    assert np.isnan(prs[1]).all()
    np.testing.assert_allclose(mpr, [1.0, 1.0])
    # mean over the two valid queries only
    gnd = [{"ok": [0]}, {"ok": []}, {"ok": [2]}]
    ranks = np.array([[0, 0, 0], [1, 1, 1], [2, 2, 2]])
    m, aps, _, _ = compute_map(ranks, gnd)
    # query 2: positive at 0-based 2 -> (0/2 + 1/3)/2 = 1/6
    assert m == pytest.approx((1.0 + 1 / 6) / 2)
    # all queries empty -> NaN, not a crash
    m, _, mpr, _ = compute_map(ranks, [{"ok": []}] * 3)
    assert math.isnan(m) and np.isnan(mpr).all()


def test_truncated_ranking_missing_a_positive():
    # top-3 list holds one of two positives: AP = (1 + 1)/2 / 2 = 0.5
    _, ap, _, prs = _one([4, 8, 9], ok=[4, 7])
    assert ap == pytest.approx(0.5)
    # the missing positive is "after the list", so kq = k: 1/1, 1/5, 1/10
    np.testing.assert_allclose(prs, [1.0, 0.2, 0.1])
    # nothing found at all
    _, ap, _, prs = _one([1, 2, 3], ok=[7])
    assert ap == 0.0 and (prs == 0).all()
    # FAISS pads with -1: padding is ignored
    _, ap2, _, prs2 = _one([4, 8, 9, -1, -1], ok=[4, 7])
    assert ap2 == pytest.approx(0.5)
    np.testing.assert_allclose(prs2, [1.0, 0.2, 0.1])


def test_truncated_equals_full_when_all_positives_retrieved():
    rng = np.random.default_rng(3)
    n_db, nq = 60, 5
    full = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)  # (n_db, n_q)
    gnd = []
    for i in range(nq):
        ok = full[rng.choice(15, 3, replace=False), i]  # positives inside the top 15
        junk = full[rng.choice(np.arange(15, 60), 4, replace=False), i]
        gnd.append({"ok": ok, "junk": junk})
    m_full, aps_full, mpr_full, _ = compute_map(full, gnd, (1, 5, 10))
    trunc = [full[:20, i] for i in range(nq)]
    m_tr, aps_tr, mpr_tr, _ = compute_map(trunc, gnd, (1, 5, 10))
    assert m_tr == pytest.approx(m_full)
    np.testing.assert_allclose(aps_tr, aps_full)
    np.testing.assert_allclose(mpr_tr, mpr_full)


def test_mp_at_k_hand_values():
    # positives at 1-based positions 1, 3, 8 (negatives elsewhere)
    ranking = [10, 90, 11, 91, 92, 93, 94, 12, 95, 96, 97]
    _, _, _, prs = _one(ranking, ok=[10, 11, 12])
    # P@1: kq=1 -> 1/1 ; P@5: kq=5 -> 2/5 ; P@10: kq=min(10, 8)=8 -> 3/8 (reference's capped denominator)
    np.testing.assert_allclose(prs, [1.0, 0.4, 3 / 8])
    # a single positive at position 2: P@1 = 0, P@5 -> kq = 2 -> 1/2
    _, _, _, prs = _one([90, 10, 91, 92], ok=[10], kappas=(1, 5))
    np.testing.assert_allclose(prs, [0.0, 0.5])


def test_ok_and_junk_overlap_follows_reference():
    # id 2 is both ok and junk: it counts as a positive at its own place, and is removed for later ones
    # ranking [2, 9, 3]: positives 2 (pos 0) and 3 (raw 2, one junk before -> 1) -> AP = 1
    _, ap, _, _ = _one([2, 9, 3], ok=[2, 3], junk=[2])
    assert ap == pytest.approx(1.0)


def test_three_protocols_from_easy_hard_junk():
    gnd = [{"easy": [0], "hard": [1], "junk": [2], "bbx": [0, 0, 1, 1]}]
    ranking = np.array([[2], [1], [3], [0], [4]])  # (n_db, n_q)
    e = protocol_gnd(gnd, "easy")[0]
    assert sorted(e["ok"]) == [0] and sorted(e["junk"]) == [1, 2]
    mid = protocol_gnd(gnd, "medium")[0]
    assert sorted(mid["ok"]) == [0, 1] and sorted(mid["junk"]) == [2]
    h = protocol_gnd(gnd, "Hard")[0]
    assert sorted(h["ok"]) == [1] and sorted(h["junk"]) == [0, 2]
    with pytest.raises(ValueError):
        protocol_gnd(gnd, "extreme")

    res = evaluate_all(ranking, gnd, kappas=(1, 5))
    # easy: junk-free ranking [3, 0, 4] -> positive at 0-based 1 -> (0/1 + 1/2)/2 = 1/4
    assert res["easy"]["map"] == pytest.approx(0.25)
    assert res["easy"]["mp@1"] == pytest.approx(0.0) and res["easy"]["mp@5"] == pytest.approx(0.5)
    # medium: junk-free [1, 3, 0, 4] -> positives at 0, 2 -> 19/24
    assert res["medium"]["map"] == pytest.approx(19 / 24)
    assert res["medium"]["mp@5"] == pytest.approx(2 / 3)
    # hard: junk-free [1, 3, 4] -> positive at 0 -> 1
    assert res["hard"]["map"] == pytest.approx(1.0)
    assert res["hard"]["n_queries"] == 1 and res["hard"]["aps"] == [pytest.approx(1.0)]


def test_hard_protocol_skips_queries_without_hard_images():
    gnd = [{"easy": [0], "hard": [], "junk": []}, {"easy": [1], "hard": [0], "junk": []}]
    ranks = np.array([[0, 0], [1, 1], [2, 2]])
    res = evaluate_all(ranks, gnd)
    assert res["hard"]["n_queries"] == 1 and res["hard"]["aps"][0] is None
    assert res["hard"]["map"] == pytest.approx(1.0)
    assert res["easy"]["n_queries"] == 2
    # query 1 easy: junk = [0] (hard) -> junk-free ranking [1, 2] -> AP 1
    assert res["easy"]["map"] == pytest.approx(1.0)


def test_input_layouts_agree():
    rng = np.random.default_rng(0)
    full = np.stack([rng.permutation(30) for _ in range(4)], axis=1)
    gnd = [{"ok": rng.choice(30, 4, replace=False), "junk": rng.choice(30, 3, replace=False)} for _ in range(4)]
    a = compute_map(full, gnd)
    b = compute_map([full[:, i].tolist() for i in range(4)], gnd)
    assert a[0] == pytest.approx(b[0])
    np.testing.assert_allclose(a[3], b[3])
    with pytest.raises(ValueError):
        compute_map(full[:, :3], gnd)


# ---------------------------------------------------------------- independent implementation
def _loop_reference(ranking, ok, junk, kappas):
    """Walk the ranking once: junk entries are skipped for the positions of later items only."""
    ok_set, junk_set = set(int(x) for x in ok), set(int(x) for x in junk)
    n_pos = len(list(ok))
    hits_at = []  # 1-based junk-free positions of the positives
    kept = 0
    for item in ranking:
        item = int(item)
        if item in ok_set:
            hits_at.append(kept + 1)
        if item not in junk_set:  # a junk entry (even one also listed as ok) is removed for later items
            kept += 1
    # AP: trapezoid between successive recall levels; precision before/after each hit
    ap = 0.0
    for j, p in enumerate(hits_at):
        before = 1.0 if p == 1 else j / (p - 1)
        after = (j + 1) / p
        ap += 0.5 * (before + after) / n_pos
    found_all = len(set(int(x) for x in ranking) & ok_set) == len(ok_set)
    prec = []
    for k in kappas:
        if not hits_at:
            prec.append(0.0)
            continue
        kq = min(k, max(hits_at)) if found_all else k
        prec.append(sum(1 for p in hits_at if p <= kq) / kq)
    return ap, prec


@pytest.mark.parametrize("seed", range(5))
def test_against_independent_loop_on_random_rankings(seed):
    rng = np.random.default_rng(seed)
    n_db, nq, kappas = 80, 12, (1, 3, 5, 10, 50)
    full = np.stack([rng.permutation(n_db) for _ in range(nq)], axis=1)
    gnd, truncated = [], []
    for i in range(nq):
        n_ok = int(rng.integers(0, 8))
        ok = rng.choice(n_db, n_ok, replace=False)
        junk = rng.choice(n_db, int(rng.integers(0, 10)), replace=False)  # may overlap ok
        gnd.append({"ok": ok, "junk": junk})
        truncated.append(full[: int(rng.integers(1, n_db)), i])
    for ranks, per_query in ((full, [full[:, i] for i in range(nq)]), (truncated, truncated)):
        m, aps, mpr, prs = compute_map(ranks, gnd, kappas)
        exp_aps, exp_prs = [], []
        for i in range(nq):
            if len(gnd[i]["ok"]) == 0:
                assert math.isnan(aps[i])
                continue
            ap, pr = _loop_reference(per_query[i], gnd[i]["ok"], gnd[i]["junk"], kappas)
            assert aps[i] == pytest.approx(ap, abs=1e-12)
            np.testing.assert_allclose(prs[i], pr, atol=1e-12)
            exp_aps.append(ap)
            exp_prs.append(pr)
        assert m == pytest.approx(np.mean(exp_aps), abs=1e-12)
        np.testing.assert_allclose(mpr, np.mean(exp_prs, axis=0), atol=1e-12)


# ---------------------------------------------------------------- curves
def test_precision_recall_curve_hand_values():
    precision, recall = precision_recall_curve([1, 50, 7, 2], ok=[1, 2], junk=[50])
    np.testing.assert_allclose(precision, [1.0, 0.5, 2 / 3])
    np.testing.assert_allclose(recall, [0.5, 0.5, 1.0])
    with pytest.raises(ValueError):
        precision_recall_curve([1, 2], ok=[])


def test_mean_pr_curve_hand_values():
    # query 0: positives at junk-free 0 and 2 -> (R .5, P 1), (R 1, P 2/3)
    # query 1: one positive at 0-based 1 -> (R 1, P 1/2); query 2: no positives (skipped)
    ranks = [np.array([1, 9, 2]), np.array([8, 3]), np.array([4])]
    gnd = [{"ok": [1, 2]}, {"ok": [3]}, {"ok": []}]
    levels, prec = mean_pr_curve(ranks, gnd, recall_levels=[0.0, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(levels, [0.0, 0.5, 0.75, 1.0])
    np.testing.assert_allclose(prec, [(1 + 0.5) / 2, (1 + 0.5) / 2, (2 / 3 + 0.5) / 2, (2 / 3 + 0.5) / 2])
    # a query that never reaches a recall level contributes 0 there
    levels, prec = mean_pr_curve([np.array([1, 5])], [{"ok": [1, 2]}], recall_levels=[0.5, 1.0])
    np.testing.assert_allclose(prec, [1.0, 0.0])


def test_museum_landmarks_oracle_and_reversed_rankings():
    """On the real ground truth: positives first gives mAP 1 for every protocol; positives last gives less."""
    from pathlib import Path

    gnd_path = Path(__file__).resolve().parents[2] / "shared" / "data" / "museum-landmarks" / "gnd.json"
    if not gnd_path.exists():
        pytest.skip("museum-landmarks data not available")
    from storage.datasets import load_gnd_json

    ds = load_gnd_json(str(gnd_path))
    n = ds.n_images
    for protocol in ("easy", "medium", "hard"):
        pg = protocol_gnd(ds.gnd, protocol)
        oracle, worst = [], []
        for g in pg:
            rest = np.setdiff1d(np.arange(n), np.concatenate([g["ok"], g["junk"]]))
            oracle.append(np.concatenate([g["junk"], g["ok"], rest]))  # junk on top must not hurt
            worst.append(np.concatenate([rest, g["junk"], g["ok"]]))
        m, aps, mpr, _ = compute_map(oracle, pg)
        n_valid = sum(len(g["ok"]) > 0 for g in pg)
        assert int((~np.isnan(aps)).sum()) == n_valid > 0
        assert m == pytest.approx(1.0) and np.allclose(mpr, 1.0)
        m_worst, _, _, _ = compute_map(worst, pg)
        assert m_worst < 0.05


def test_paired_bootstrap_hand_cases():
    from pipeline.evaluation import paired_bootstrap
    same = paired_bootstrap([1.0, 0.5, 0.25], [1.0, 0.5, 0.25])
    assert same == {"diff": 0.0, "low": 0.0, "high": 0.0, "better": 0, "worse": 0, "n": 3}
    # every query gains 0.1: every resample's mean gain is 0.1
    shift = paired_bootstrap([0.2, 0.5, 0.7, 0.9], [0.3, 0.6, 0.8, 1.0])
    assert shift["diff"] == pytest.approx(0.1) and shift["low"] == pytest.approx(0.1)
    assert shift["high"] == pytest.approx(0.1) and (shift["better"], shift["worse"]) == (4, 0)
    # differences (0, 1): resample means are 0, 0.5, 1 with probabilities 1/4, 1/2, 1/4 -> 95 % interval [0, 1];
    # the NaN query (no positives) is dropped from both methods
    two = paired_bootstrap([1.0, 0.0, np.nan], [1.0, 1.0, np.nan])
    assert (two["diff"], two["low"], two["high"], two["n"]) == (0.5, 0.0, 1.0, 2)
    with pytest.raises(ValueError):
        paired_bootstrap([1.0], [1.0, 0.5])


def test_paired_bootstrap_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    from pipeline.evaluation import paired_bootstrap
    rng = np.random.default_rng(3)
    a = rng.uniform(0, 1, 300)
    b = np.clip(a + rng.normal(0.02, 0.1, 300), 0, 1)
    ours = paired_bootstrap(a, b, n_resamples=20000, seed=1)
    ref = scipy_stats.bootstrap((b - a,), np.mean, n_resamples=20000, method="percentile",
                                confidence_level=0.95, random_state=7).confidence_interval
    assert ours["diff"] == pytest.approx(float(np.mean(b - a)))
    assert ours["low"] == pytest.approx(ref.low, abs=0.002) and ours["high"] == pytest.approx(ref.high, abs=0.002)


def test_compare_methods_reads_report_aps():
    from experiments.compare_methods import compare
    aps = {"medium": {"aps": [1.0, 0.5, 0.25, 1.0]}, "hard": {"aps": [None, None, None, None]}}
    better = {"medium": {"aps": [1.0, 1.0, 0.25, 1.0]}, "hard": {"aps": [None, None, None, None]}}
    report = {"tracks": {"t": {"methods": {"a": aps, "b": better}}, "u": {"methods": {"a": aps}}}}
    rows = compare(report, "a", "b")
    assert len(rows) == 1 and rows[0]["track"] == "t" and rows[0]["protocol"] == "medium"
    assert rows[0]["map_a"] == pytest.approx(68.75) and rows[0]["map_b"] == pytest.approx(81.25)
    assert rows[0]["diff"] == pytest.approx(0.125) and (rows[0]["better"], rows[0]["worse"]) == (1, 0)
