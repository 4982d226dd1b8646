"""ZoomTool (vigorl_cli/vision/zoom.py) against the reference crop (digest §1.9).

Reference: window [x-offset, x+offset] x [y-offset, y+offset] clipped at the border (not re-centred), right <= left ->
right = left + 1, optional dot (r 7, red, white outline width 2) at (x-left, y-top), then resize to the smart-resized
square (512 -> 504, 384 -> 392, 672 -> 672) with PIL's default (bicubic) resampling.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageDraw

from vigorl_cli.vision.frames import Frame, InvalidPoint, PointOutsideImage, resize_image
from vigorl_cli.vision.zoom import PRESETS, VSTAR, WEB_GROUNDING, WEB_GROUNDING_RL, Crop, ZoomTool

FAST = settings(max_examples=30, deadline=None)


def black(W: int, H: int) -> Image.Image:
    return Image.new("RGB", (W, H), (0, 0, 0))


def gradient(W: int, H: int) -> Image.Image:
    """Every pixel different enough to catch off-by-one windows."""
    xs, ys = np.meshgrid(np.arange(W), np.arange(H))
    a = np.stack([xs % 256, ys % 256, (xs * 7 + ys * 13) % 256], axis=-1).astype(np.uint8)
    return Image.fromarray(a, "RGB")


def reference_crop(image, point, offset, crop_size, draw_dot):
    """The reference ``_get_point_crop``, transcribed (fetch_image's resize: 28-multiple square, PIL default)."""
    x, y = point
    width, height = image.size
    left, top = max(0, x - offset), max(0, y - offset)
    right, bottom = min(width, x + offset), min(height, y + offset)
    if right <= left:
        right = left + 1
    if bottom <= top:
        bottom = top + 1
    crop = image.crop((left, top, right, bottom))
    if draw_dot:
        d = ImageDraw.Draw(crop)
        dx, dy, r = x - left, y - top, 7
        d.ellipse([(dx - r, dy - r), (dx + r, dy + r)], fill="red", outline="white", width=2)
    side = max(28, round(crop_size / 28) * 28)
    return crop.convert("RGB").resize((side, side))


# ---------------------------------------------------------------------------------------------------------------------
# Windows: clipped at the border, not re-centred
# ---------------------------------------------------------------------------------------------------------------------

def test_zoom_clamps_window_at_image_border():
    # 1000x800, point (10, 790), offset 182: left = max(0, -172) = 0, top = max(0, 608) = 608,
    # right = min(1000, 192) = 192, bottom = min(800, 972) = 800 -> (0, 608, 192, 800), a 192x192 window.
    c = VSTAR.crop(black(1000, 800), (10, 790))
    assert c.window == (0, 608, 192, 800)
    assert c.frame.window == (0, 608, 192, 800)
    assert c.image.size == (672, 672)
    assert c.point == (10, 790)


@pytest.mark.parametrize("point, window", [
    ((0, 0), (0, 0, 182, 182)),                # top-left corner: only the lower-right quarter of the window
    ((999, 0), (817, 0, 1000, 182)),           # top-right
    ((0, 799), (0, 617, 182, 800)),            # bottom-left
    ((999, 799), (817, 617, 1000, 800)),       # bottom-right
    ((1000, 800), (818, 618, 1000, 800)),      # far edge (accepted, as by the reference's `x > width` check)
    ((500, 400), (318, 218, 682, 582)),        # interior: the full 364x364 window
    ((500, 5), (318, 0, 682, 187)),            # top edge: 364 wide, 187 tall -> stretched to a square
])
def test_zoom_window_is_clipped_not_recentred(point, window):
    assert VSTAR.crop(black(1000, 800), point).window == window


@pytest.mark.parametrize("tool, side", [(VSTAR, 672), (WEB_GROUNDING, 504), (WEB_GROUNDING_RL, 392)])
def test_zoom_output_is_smart_resized_square(tool, side):
    assert tool.output_size == (side, side)
    for point in [(0, 0), (300, 200), (599, 399)]:  # clipped windows are stretched to the same square
        assert tool.crop(black(600, 400), point).image.size == (side, side)


def test_zoom_presets_hold_reference_settings():
    assert (VSTAR.offset, VSTAR.crop_size, VSTAR.draw_dot) == (182, 672, False)
    assert (WEB_GROUNDING.offset, WEB_GROUNDING.crop_size, WEB_GROUNDING.draw_dot) == (100, 512, True)
    assert (WEB_GROUNDING_RL.offset, WEB_GROUNDING_RL.crop_size, WEB_GROUNDING_RL.draw_dot) == (50, 384, True)
    assert ZoomTool.preset("vstar") == VSTAR and set(PRESETS) == {"vstar", "web_grounding", "web_grounding_rl"}
    assert ZoomTool.preset("web_grounding", source="original").source == "original"
    with pytest.raises(ValueError):
        ZoomTool.preset("nope")
    with pytest.raises(ValueError):
        ZoomTool(offset=-1, crop_size=512, draw_dot=True)


# ---------------------------------------------------------------------------------------------------------------------
# Pixels: identical to the reference pipeline
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tool", [VSTAR, WEB_GROUNDING, WEB_GROUNDING_RL])
@pytest.mark.parametrize("point", [(10, 790), (500, 400), (999, 0), (1000, 800)])
def test_zoom_pixels_match_reference_crop(tool, point):
    img = gradient(1000, 800)
    ours = tool.crop(img, point).image
    ref = reference_crop(img, point, tool.offset, tool.crop_size, tool.draw_dot)
    assert ours.size == ref.size and ours.tobytes() == ref.tobytes()


def test_zoom_dot_is_red_with_white_outline_at_the_point():
    # Black 1000x800, point (10, 790), web grounding (offset 100, 512 -> 504): window (0, 690, 110, 800), 110x110,
    # scale 504/110 = 4.582. Dot centre in the crop: ((10 + 0.5) * 4.582 - 0.5, (100 + 0.5) * 4.582 - 0.5)
    # = (47.6, 460.0) -> pixel (48, 460).
    img = black(1000, 800)
    c = WEB_GROUNDING.crop(img, (10, 790))
    assert c.window == (0, 690, 110, 800)
    assert c.point_in_crop() == (48, 460)
    a = np.asarray(c.image).astype(int)
    r, g, b = a[460, 48]
    assert r > 220 and g < 40 and b < 40                      # red centre
    # The white outline is the 2 px ring at columns x-7, x-6 = 3..4 before resizing -> [3, 5) * 4.582 = [13.7, 22.9)
    # after: column 18 on the centre row is white.
    assert a[460, 18].min() > 200
    assert (a.min(axis=-1) > 230).sum() > 100                  # a ring's worth of white pixels
    assert np.asarray(img).max() == 0                          # the source image is not drawn on


def test_zoom_without_dot_leaves_pixels_untouched():
    img = gradient(600, 400)
    c = VSTAR.crop(img, (300, 200))
    expected = img.crop(c.window).resize(c.image.size, Image.Resampling.BICUBIC)
    assert c.image.tobytes() == expected.tobytes()


# ---------------------------------------------------------------------------------------------------------------------
# The crop's frame
# ---------------------------------------------------------------------------------------------------------------------

@st.composite
def crop_cases(draw):
    W, H = draw(st.integers(1, 400)), draw(st.integers(1, 400))
    point = (draw(st.integers(0, W)), draw(st.integers(0, H)))
    tool = ZoomTool(offset=draw(st.integers(0, 120)), crop_size=draw(st.sampled_from([28, 56, 100, 112])),
                    draw_dot=draw(st.booleans()))
    return black(W, H), point, tool


@FAST
@given(crop_cases())
def test_zoom_window_stays_inside_image_and_contains_point(case):
    img, (x, y), tool = case
    c = tool.crop(img, (x, y))
    left, top, right, bottom = c.window
    W, H = img.size
    assert 0 <= left < right <= W and 0 <= top < bottom <= H   # 1-px windows at the extreme border included
    assert left <= x <= right and top <= y <= bottom
    assert right - left <= max(1, 2 * tool.offset) and bottom - top <= max(1, 2 * tool.offset)
    assert c.image.size == tool.output_size


@FAST
@given(crop_cases())
def test_zoom_point_in_crop_maps_back_to_requested_point(case):
    img, point, tool = case
    c = tool.crop(img, point)
    back = c.frame.map_to(c.point_in_crop(), c.parent)
    W, H = img.size
    expected = (min(point[0], W - 1), min(point[1], H - 1))  # far-edge points sit on the last pixel
    # Exact when the crop magnifies (every reference preset: 364 -> 672, 200 -> 504, 100 -> 392); a crop smaller than
    # its window (tiny crop_size here) loses up to half a crop pixel, floor(0.5 + s/2) model pixels.
    for axis in (0, 1):
        s = c.frame.scale[axis] / c.parent.scale[axis]  # model pixels per crop pixel
        bound = 0 if s <= 1 else math.floor(0.5 + s / 2)
        assert abs(back[axis] - expected[axis]) <= bound


def test_zoom_crop_centre_maps_to_requested_point():
    # Interior window (318, 218, 682, 582) at 672: crop centre pixel 336 -> 318 + 336.5 * 364/672 - 0.5 = 499.77 -> 500.
    c = VSTAR.crop(black(1000, 800), (500, 400))
    assert c.frame.to_original((336, 336)) == (500, 400)
    assert c.frame.to_original((336, 336), exact=True) == pytest.approx((499.77, 399.77), abs=0.01)


def test_zoom_on_resized_view_maps_crop_to_original():
    # Model saw 1000x800 at 500x400 (s = 2). Point (250, 200) -> window (150, 100, 350, 300) in the shown image,
    # (300, 200, 700, 600) in the original; the crop centre lands on the original point under the shown pixel:
    # (250 + 0.5) * 2 - 0.5 = 500.5 -> original ~ (500, 400).
    full = Frame.resized(1000, 800, 500, 400)
    shown = resize_image(gradient(1000, 800), full)
    c = WEB_GROUNDING.crop(shown, (250, 200), full)
    assert c.window == (150, 100, 350, 300)
    assert c.frame.window == (300, 200, 700, 600) and c.frame.kind == "crop"
    X, Y = c.frame.to_original((252, 252), exact=True)
    assert abs(X - 500) <= 1 and abs(Y - 400) <= 1
    assert c.frame.map_to(c.point_in_crop(), full) == (250, 200)


def test_zoom_from_original_matches_shown_geometry_at_higher_resolution():
    full = Frame.resized(1000, 800, 500, 400)
    orig = gradient(1000, 800)
    shown = resize_image(orig, full)
    a = WEB_GROUNDING.crop(shown, (250, 200), full)
    b = ZoomTool.preset("web_grounding", source="original").crop(orig, (250, 200), full)
    assert b.frame == a.frame and b.window == a.window and b.source == "original"
    assert b.image.size == a.image.size
    r, g, bl = b.image.getpixel(b.point_in_crop())
    assert r > 220 and g < 40 and bl < 40
    # Wrong image for the source: explicit errors, not a silently wrong crop.
    with pytest.raises(ValueError):
        WEB_GROUNDING.crop(orig, (250, 200), full)
    with pytest.raises(ValueError):
        ZoomTool.preset("web_grounding", source="original").crop(shown, (250, 200), full)


@pytest.mark.parametrize("tool", [VSTAR, WEB_GROUNDING])
def test_zoom_from_original_equals_shown_when_model_saw_the_original(tool):
    img = gradient(640, 480)
    a = tool.crop(img, (20, 470))
    b = ZoomTool(tool.offset, tool.crop_size, tool.draw_dot, source="original").crop(img, (20, 470))
    assert a.image.tobytes() == b.image.tobytes() and a.frame == b.frame


def test_zoom_refuses_crop_frames():
    c = Frame.crop(100, 100, (0, 0, 50, 50), 28)
    with pytest.raises(ValueError):
        VSTAR.crop(black(28, 28), (3, 3), c)


def test_zoom_record_is_json_safe():
    c = WEB_GROUNDING_RL.crop(black(300, 200), (290, 10))
    d = json.loads(json.dumps(c.to_dict()))
    assert d["point"] == [290, 10] and d["window"] == [240, 0, 300, 60]
    assert Frame.from_dict(d["frame"]) == c.frame and Frame.from_dict(d["parent"]) == c.parent
    assert isinstance(c, Crop)


# ---------------------------------------------------------------------------------------------------------------------
# Bad points and degenerate windows
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("point", [(-1, 10), (10, -1), (1001, 10), (10, 801), (5000, -3)])
def test_zoom_point_outside_image_raises_explicit_kind(point):
    with pytest.raises(PointOutsideImage) as e:
        VSTAR.crop(black(1000, 800), point)
    assert e.value.kind == "point_outside_image"


@pytest.mark.parametrize("point", [None, (1,), (1, 2, 3), ("a", 2), (float("nan"), 3)])
def test_zoom_malformed_point_raises_invalid_point(point):
    with pytest.raises(InvalidPoint) as e:
        VSTAR.crop(black(100, 100), point)
    assert e.value.kind == "invalid_point"


@pytest.mark.parametrize("point, window", [
    ((0, 0), (0, 0, 1, 1)),
    ((99, 49), (99, 49, 100, 50)),
    ((100, 50), (99, 49, 100, 50)),   # far edge with offset 0: the reference's (100, 101) window would leave the image
])
def test_zoom_one_pixel_window_at_extreme_border_does_not_crash(point, window):
    tool = ZoomTool(offset=0, crop_size=56, draw_dot=True)
    c = tool.crop(gradient(100, 50), point)
    assert c.window == window and c.image.size == (56, 56)


def test_zoom_on_one_pixel_image():
    c = WEB_GROUNDING.crop(Image.new("RGB", (1, 1), (0, 255, 0)), (0, 0))
    assert c.window == (0, 0, 1, 1) and c.image.size == (504, 504)


def test_zoom_floors_float_points_like_reference_int():
    c = VSTAR.crop(black(1000, 800), (500.9, 399.2))
    assert c.point == (500, 399)
