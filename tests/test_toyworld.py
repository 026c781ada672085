import numpy as np
import pytest

from difstudy.data.toyworld import (
    CLASS_NAMES,
    CLASSES,
    NUM_PARTS,
    ToyWorld,
    local_part_mask,
    part_id,
    render,
    vocabulary,
)


def test_deterministic_and_splits_differ():
    a, b = ToyWorld("test", n=12), ToyWorld("test", n=12)
    for i in range(12):
        assert np.array_equal(a[i].image, b[i].image) and np.array_equal(a[i].mask, b[i].mask)
        assert a[i].fine_caption == b[i].fine_caption
    tr = ToyWorld("train", n=12)
    assert not np.array_equal(a[0].image, tr[0].image)
    assert not np.array_equal(ToyWorld("test", n=1, seed=1)[0].image, a[0].image)


def test_annotations_are_consistent():
    w = ToyWorld("val", n=60)
    complexities, vis = set(), []
    for s in w:
        spec = CLASSES[s.label]
        assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
        ids = set(np.unique(s.mask)) - {0}
        lo, hi = part_id(s.label, spec.parts[0].name), part_id(s.label, spec.parts[-1].name)
        assert ids and all(lo <= i <= hi for i in ids), "part ids belong to the sample's class"
        ys, xs = np.nonzero(s.mask)
        assert s.bbox == (xs.min(), ys.min(), xs.max(), ys.max()), "box matches the mask"
        assert len(s.keypoints) >= 6 and s.visible.sum() >= 1
        vis.append(s.visible.mean())
        for (name, part, _), xy, v in zip(spec.keypoints, s.keypoints, s.visible):
            if v:  # a visible keypoint lies on its own part
                assert s.mask[int(xy[1]), int(xy[0])] == part_id(s.label, part), name
        assert s.caption == f"a photo of a {CLASS_NAMES[s.label]}"
        assert CLASS_NAMES[s.label] in s.fine_caption and set(s.fine_caption.replace(",", "").split()) <= set(
            vocabulary()
        )
        complexities.add(s.complexity)
    assert complexities == {0, 1, 2, 3}
    assert np.mean(vis) > 0.85  # keypoints are hidden only by occlusion, pose or cropping


def test_classes_parts_keypoints_and_local_ids():
    assert len(CLASSES) >= 10
    assert all(len(c.parts) >= 4 and len(c.keypoints) >= 6 for c in CLASSES)
    assert NUM_PARTS == 1 + sum(len(c.parts) for c in CLASSES)
    s = render(0, "test", 3)
    local = local_part_mask(s.mask, s.label)
    assert local.max() <= len(CLASSES[s.label].parts) and ((local > 0) == (s.mask > 0)).all()


def test_pairs_share_visible_keypoints():
    w = ToyWorld("test", n=40)
    pairs = w.pairs(15, seed=0)
    assert len(pairs) == 15 and len(set(pairs)) == 15
    for a, b in pairs:
        assert a != b and w[a].label == w[b].label
        assert (w[a].visible & w[b].visible).sum() >= 3
    assert pairs == w.pairs(15, seed=0) and pairs != w.pairs(15, seed=1)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        ToyWorld("training")
    with pytest.raises(ValueError, match="multiple of 8"):
        ToyWorld("test", size=60)
    with pytest.raises(IndexError):
        ToyWorld("test", n=3)[3]
