"""Region proposal network (seed 003 §3.2 / Faster R-CNN): anchors, labelling, box coding and losses against
hand-computed values, proposal selection, and training on a planted problem."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torchvision.models.detection._utils import BoxCoder

from pipeline.pooling import rmac_grid
from pipeline.regions import box_iou
from pipeline.rpn import (RPNConfig, RPNHead, decode_boxes, encode_boxes, label_anchors, make_anchors, propose,
                          rpn_from_arrays, rpn_loss, sample_anchors, select_proposals, train_rpn)

torch.set_num_threads(1)


def test_make_anchors_by_hand() -> None:
    a = make_anchors(1, 2, 32, sizes=(64,), ratios=(0.5, 1.0, 2.0)).numpy()
    assert a.shape == (6, 4)
    w, h = 64 / math.sqrt(0.5), 64 * math.sqrt(0.5)  # ratio = height / width, area 64^2
    np.testing.assert_allclose(a[0], [16 - w / 2, 16 - h / 2, 16 + w / 2, 16 + h / 2], atol=1e-4)
    np.testing.assert_allclose(a[1], [-16, -16, 48, 48], atol=1e-5)
    np.testing.assert_allclose(a[2], [16 - h / 2, 16 - w / 2, 16 + h / 2, 16 + w / 2], atol=1e-4)
    np.testing.assert_allclose(a[4], [16, -16, 80, 48], atol=1e-5)  # second cell, centre (48, 16)
    # ratio-major order: a = ratio_index * len(sizes) + size_index
    b = make_anchors(2, 1, 10, sizes=(4, 8), ratios=(1.0, 4.0)).numpy()
    np.testing.assert_allclose(b[:4], [[3, 3, 7, 7], [1, 1, 9, 9], [4, 1, 6, 9], [3, -3, 7, 13]], atol=1e-5)
    np.testing.assert_allclose(b[4], [3, 13, 7, 17], atol=1e-5)  # cell (y=1, x=0), centre (5, 15)
    # the defaults give 12 anchors per cell on a 16 x 16 map of a 512 px image
    cfg = RPNConfig()
    assert make_anchors(16, 16, cfg.stride, cfg.anchor_sizes, cfg.aspect_ratios).shape == (16 * 16 * 12, 4)


def test_label_anchors_by_hand() -> None:
    gt = torch.tensor([[0, 0, 10, 10], [100, 100, 110, 110]], dtype=torch.float32)
    anchors = torch.tensor([
        [0, 0, 10, 10],        # IoU 1 with gt0                  -> positive
        [0, 0, 10, 5],         # IoU 0.5                         -> ignored
        [0, 0, 10, 2],         # IoU 0.2                         -> negative
        [20, 20, 30, 30],      # IoU 0                           -> negative
        [100, 100, 110, 104],  # IoU 0.4, gt1's best (tied)      -> positive
        [100, 100, 110, 102],  # IoU 0.2                         -> negative
        [100, 106, 110, 110],  # IoU 0.4, tied best of gt1       -> positive
        [0, 0, 10, 8],         # IoU 0.8 >= 0.7, not gt0's best  -> positive
    ], dtype=torch.float32)
    cfg = RPNConfig()
    labels, matched = label_anchors(anchors, gt, cfg)
    assert labels.tolist() == [1, -1, 0, 0, 1, 0, 1, 1]
    assert matched[labels == 1].tolist() == [0, 1, 1, 0]
    # no box: every anchor negative
    labels0, _ = label_anchors(anchors, torch.zeros((0, 4)), cfg)
    assert labels0.tolist() == [0] * 8
    # the paper's rule for cross-boundary anchors, when asked for
    cfg_b = RPNConfig(allowed_border=0.0)
    labels_b, _ = label_anchors(anchors, gt, cfg_b, image_hw=(50.0, 50.0))
    assert labels_b.tolist() == [1, -1, 0, 0, -1, -1, -1, 1]


def test_sample_anchors_caps_positives_and_fills_with_negatives() -> None:
    cfg = RPNConfig()
    labels = torch.tensor([1] * 300 + [0] * 1000 + [-1] * 50)
    out = sample_anchors(labels, cfg, torch.Generator().manual_seed(0))
    assert int((out == 1).sum()) == 128 and int((out == 0).sum()) == 128
    assert bool(((out == 1) <= (labels == 1)).all()) and bool(((out == 0) <= (labels == 0)).all())
    few = torch.tensor([1] * 10 + [0] * 1000)
    out = sample_anchors(few, cfg, torch.Generator().manual_seed(0))
    assert int((out == 1).sum()) == 10 and int((out == 0).sum()) == 246
    again = sample_anchors(few, cfg, torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_box_encoding_by_hand_and_against_torchvision() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 20.0], [5.0, 5.0, 15.0, 15.0]])
    gt = torch.tensor([[2.0, 4.0, 14.0, 28.0], [5.0, 5.0, 15.0, 15.0]])
    # anchor 0: centre (5, 10), size 10 x 20; box: centre (8, 16), size 12 x 24
    t = encode_boxes(anchors, gt)
    np.testing.assert_allclose(t[0].numpy(), [0.3, 0.3, math.log(1.2), math.log(1.2)], atol=1e-6)
    np.testing.assert_allclose(t[1].numpy(), [0, 0, 0, 0], atol=1e-7)
    np.testing.assert_allclose(decode_boxes(anchors, t).numpy(), gt.numpy(), atol=1e-5)
    ref = BoxCoder((1.0, 1.0, 1.0, 1.0)).encode_single(gt, anchors)
    np.testing.assert_allclose(t.numpy(), ref.numpy(), atol=1e-6)
    # huge size deltas are capped like torchvision's
    big = decode_boxes(anchors[:1], torch.tensor([[0.0, 0.0, 100.0, 0.0]]))
    assert float(big[0, 2] - big[0, 0]) == pytest.approx(10 * 1000 / 16, rel=1e-5)


def test_head_output_layout_matches_anchor_order() -> None:
    H, W, A = 2, 3, 4
    head = RPNHead(1, A, mid_channels=1)
    with torch.no_grad():
        for layer in (head.conv, head.cls, head.reg):
            layer.weight.zero_()
            layer.bias.zero_()
        head.conv.weight[0, 0, 1, 1] = 1.0               # mid = input
        head.cls.weight[:] = 1.0
        head.cls.bias.copy_(1000.0 * torch.arange(A))    # logit = cell + 1000 a
        head.reg.weight[:] = 1.0
        head.reg.bias.copy_(1000.0 * torch.arange(4 * A))  # delta k of anchor a = cell + 1000 (4a + k)
    fmap = torch.arange(H * W, dtype=torch.float32).reshape(1, 1, H, W)  # value = cell index
    logits, deltas = head(fmap)
    assert logits.shape == (1, H * W * A) and deltas.shape == (1, H * W * A, 4)
    cell = torch.arange(H * W).repeat_interleave(A)
    a = torch.arange(A).repeat(H * W)
    assert torch.equal(logits[0], (cell + 1000 * a).float())
    expected = cell[:, None] + 1000 * (4 * a[:, None] + torch.arange(4)[None, :])
    assert torch.equal(deltas[0], expected.float())


def test_rpn_loss_by_hand() -> None:
    anchors = torch.tensor([[0.0, 0.0, 10.0, 10.0], [50.0, 50.0, 60.0, 60.0]])
    gt = torch.tensor([[0.0, 0.0, 10.0, 10.0]])
    logits = torch.tensor([2.0, -1.0])
    deltas = torch.tensor([[0.1, 0.0, 0.0, 0.0], [5.0, 5.0, 5.0, 5.0]])  # the negative's deltas do not count
    cls_loss, box_loss = rpn_loss(logits, deltas, anchors, gt, RPNConfig())
    # BCE: positive with logit 2, negative with logit -1, averaged over the 2 labelled anchors
    assert float(cls_loss) == pytest.approx((math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2, rel=1e-6)
    # smooth L1 (beta = 1/9) of 0.1 against target 0: 0.5 * 0.1^2 / (1/9) = 0.045, over 2 labelled anchors
    assert float(box_loss) == pytest.approx(0.045 / 2, rel=1e-5)


def test_select_proposals_by_hand() -> None:
    cfg = RPNConfig(stride=10, nms_iou=0.7, post_nms_top_n=10)
    anchors = torch.tensor([[0, 0, 50, 50], [5, 0, 55, 50], [60, 60, 120, 90], [0, 0, 5, 5]], dtype=torch.float32)
    logits = torch.tensor([3.0, 2.0, 1.0, 4.0])
    boxes, scores = select_proposals(logits, torch.zeros(4, 4), anchors, (100.0, 100.0), cfg)
    # box 3 is under one cell (10 px) -> dropped; box 1 overlaps box 0 at IoU 0.82 -> suppressed; box 2 clipped
    np.testing.assert_allclose(boxes.numpy(), [[0, 0, 50, 50], [60, 60, 100, 90]])
    np.testing.assert_allclose(scores.numpy(), [1 / (1 + math.exp(-3)), 1 / (1 + math.exp(-1))], rtol=1e-6)
    one = select_proposals(logits, torch.zeros(4, 4), anchors, (100.0, 100.0), RPNConfig(stride=10, post_nms_top_n=1))
    assert one[0].shape == (1, 4)


def _planted_map(rng: np.random.Generator, H: int = 8, W: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """A map with one object box (2-5 cells a side); channels say 'inside', its size and the direction to its
    centre, as a deep feature with a large receptive field would; the rest is noise."""
    bw, bh = rng.integers(2, 6, size=2)
    x0, y0 = rng.integers(0, W - bw + 1), rng.integers(0, H - bh + 1)
    A = np.abs(rng.normal(size=(7, H, W))).astype(np.float32) * 0.2
    ys, xs = np.mgrid[0:H, 0:W] + 0.5
    inside = np.zeros((H, W), bool)
    inside[y0:y0 + bh, x0:x0 + bw] = True
    cx, cy = x0 + bw / 2, y0 + bh / 2
    for c, v in enumerate([np.ones((H, W)), np.full((H, W), bw / 8), np.full((H, W), bh / 8),
                           np.clip((cx - xs) / 4, 0, None), np.clip((xs - cx) / 4, 0, None),
                           np.clip((cy - ys) / 4, 0, None), np.clip((ys - cy) / 4, 0, None)]):
        A[c] += np.where(inside, v, 0).astype(np.float32)
    return A, np.array([[x0, y0, x0 + bw, y0 + bh]], np.float32)


def test_training_on_planted_boxes_finds_them() -> None:
    rng = np.random.default_rng(0)
    train = [_planted_map(rng) for _ in range(100)]
    test = [_planted_map(rng) for _ in range(20)]
    cfg = RPNConfig(mid_channels=32, iterations=600, lr=3e-3)

    def best_iou_top5(arrays) -> np.ndarray:
        head, c = rpn_from_arrays(arrays, cfg)
        out = []
        for A, box in test:
            boxes, scores = propose(head, A, c)
            assert np.all(np.diff(scores) <= 0) and boxes.shape[0] <= c.post_nms_top_n
            out.append(box_iou(boxes[:5], box).max())
        return np.array(out)

    before = best_iou_top5(train_rpn(RPNConfig(mid_channels=32, iterations=0), train))
    arrays = train_rpn(cfg, train)
    after = best_iou_top5(arrays)
    grid = rmac_grid(8, 8)
    grid_best = np.array([box_iou(grid, box).max() for _, box in test])
    assert np.mean(after >= 0.5) >= 0.8, after
    assert after.mean() > before.mean() + 0.2 and np.mean(after >= 0.5) > np.mean(grid_best >= 0.5)
    # arrays round-trip: same proposals from a head rebuilt from them
    head, c = rpn_from_arrays(arrays, RPNConfig())
    assert c.anchor_sizes == cfg.anchor_sizes and c.stride == cfg.stride
    head2 = RPNHead.from_arrays(head.to_arrays())
    np.testing.assert_array_equal(propose(head, test[0][0], c)[0], propose(head2, test[0][0], c)[0])


def test_training_is_deterministic_for_a_seed() -> None:
    rng = np.random.default_rng(1)
    samples = [_planted_map(rng) for _ in range(4)]
    cfg = RPNConfig(mid_channels=8, iterations=20)
    a, b = train_rpn(cfg, samples, seed=3), train_rpn(cfg, samples, seed=3)
    c = train_rpn(cfg, samples, seed=4)
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["conv.weight"], c["conv.weight"])
    # the global torch RNG is left as it was
    torch.manual_seed(0)
    x = torch.rand(1)
    torch.manual_seed(0)
    train_rpn(cfg, samples)
    assert torch.equal(torch.rand(1), x)
