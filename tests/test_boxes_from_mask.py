"""`src.boxes_from_mask`: the tight boxes of a predicted mask (pure numpy + OpenCV)."""
import numpy as np
import pytest

from src.boxes_from_mask import mask_boxes, resolve_box_mode, slot_boxes_from_masks, union_box


def _two_blobs():
    """A 20 x 30 probability mask: a 3 x 4 blob (12 px) and a 5 x 6 blob (30 px), plus a
    diagonal 2-px speck (8-connected) and pixels under the threshold."""
    m = np.zeros((20, 30), np.float32)
    m[2:5, 3:7] = 0.9            # rows 2-4, cols 3-6
    m[10:15, 20:26] = 0.6        # rows 10-14, cols 20-25
    m[17, 1] = m[18, 2] = 1.0    # diagonal neighbours: one component with connectivity 8
    m[0:2, 10:20] = 0.3          # below 0.5: background
    return m


def test_largest_component_gives_one_tight_box_in_pixel_edges():
    np.testing.assert_array_equal(mask_boxes(_two_blobs()), [[20, 10, 26, 15]])
    np.testing.assert_array_equal(mask_boxes(_two_blobs()[..., None], mode="largest"), [[20, 10, 26, 15]])


def test_components_gives_every_box_largest_first():
    np.testing.assert_array_equal(mask_boxes(_two_blobs(), mode="components"),
                                  [[20, 10, 26, 15], [3, 2, 7, 5], [1, 17, 3, 19]])
    np.testing.assert_array_equal(union_box(mask_boxes(_two_blobs(), mode="components")), [1, 2, 26, 19])
    # the threshold decides what is foreground: at 0.25 the faint band joins in (20 px, second largest)
    b = mask_boxes(_two_blobs(), threshold=0.25, mode="components")
    assert len(b) == 4 and b[1].tolist() == [10, 0, 20, 2]


def test_min_area_drops_specks():
    m = _two_blobs()
    assert mask_boxes(m, mode="components", min_area=3).tolist() == [[20, 10, 26, 15], [3, 2, 7, 5]]
    assert mask_boxes(m, mode="components", min_area=13).tolist() == [[20, 10, 26, 15]]
    assert mask_boxes(m, mode="largest", min_area=31).shape == (0, 4)   # even the largest is too small


def test_empty_mask_and_off_give_no_box():
    assert mask_boxes(np.zeros((8, 8))).shape == (0, 4)
    assert mask_boxes(np.full((8, 8), 0.49)).shape == (0, 4)
    assert mask_boxes(_two_blobs(), mode=False).shape == (0, 4)
    assert union_box(np.zeros((0, 4))) is None
    boxes, counts = slot_boxes_from_masks(np.zeros((2, 8, 8, 1)), 4)
    assert boxes.shape == (2, 4, 4) and not boxes.any() and counts.tolist() == [0, 0]


def test_mask_touching_the_border():
    m = np.zeros((16, 16), np.uint8)
    m[0:4, 12:16] = 1     # top-right corner
    m[10:16, 0:16] = 1    # the whole bottom band
    np.testing.assert_array_equal(mask_boxes(m), [[0, 10, 16, 16]])
    np.testing.assert_array_equal(mask_boxes(m, mode="components"), [[0, 10, 16, 16], [12, 0, 16, 4]])
    np.testing.assert_array_equal(mask_boxes(np.ones((5, 7))), [[0, 0, 7, 5]])


def test_slot_boxes_are_normalised_and_fill_every_slot():
    m = np.stack([_two_blobs(), np.zeros((20, 30), np.float32)])
    boxes, counts = slot_boxes_from_masks(m, 3, mode="largest")
    assert boxes.shape == (2, 3, 4) and counts.tolist() == [3, 0]
    np.testing.assert_allclose(boxes[0], np.tile([[20 / 30, 10 / 20, 26 / 30, 15 / 20]], (3, 1)), rtol=1e-6)
    assert not boxes[1].any()
    boxes, _ = slot_boxes_from_masks(m, 3, mode="components")   # the union box of the components
    np.testing.assert_allclose(boxes[0, 0], [1 / 30, 2 / 20, 26 / 30, 19 / 20], rtol=1e-6)
    boxes, counts = slot_boxes_from_masks(m, 3, mode="components", min_area=13)
    np.testing.assert_allclose(boxes[0, 2], [20 / 30, 10 / 20, 26 / 30, 15 / 20], rtol=1e-6)
    assert counts.tolist() == [1, 0]


def test_box_modes_are_checked():
    assert [resolve_box_mode(v) for v in (False, None, "false", "largest", "components")] == \
        [None, None, None, "largest", "components"]
    with pytest.raises(ValueError, match="largest, components or false"):
        resolve_box_mode("biggest")
    with pytest.raises(ValueError, match=r"\[H, W\]"):
        mask_boxes(np.zeros((2, 4, 4, 1)))
