"""Frame: original <-> shown-image coordinates (vigorl_cli/vision/frames.py).

Rule under test: an integer point names a pixel; conversions map pixel centres, ``X = floor(left + (x + 0.5) * s)``
with ``s`` original pixels per shown pixel, and integer results are the exact (float) result rounded half up.
"""

from __future__ import annotations

import json
import math

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from vigorl_cli.vision.frames import (
    Frame,
    InvalidBox,
    InvalidPoint,
    PointOutsideImage,
    check_point,
    qwen_smart_size,
    reference_scale,
    resize_image,
)

FAST = settings(max_examples=100, deadline=None)

# ---------------------------------------------------------------------------------------------------------------------
# Strategies: random image sizes and pixel limits, and the frames the reference builds from them
# ---------------------------------------------------------------------------------------------------------------------

sides = st.integers(min_value=1, max_value=6000)


@st.composite
def qwen_sizes(draw):
    """Image sizes Qwen accepts (aspect ratio <= 200)."""
    W, H = draw(sides), draw(sides)
    assume(max(W, H) / min(W, H) <= 200)
    return W, H


@st.composite
def frames(draw):
    """A full frame from one of the reference's resizing rules, with random limits."""
    rule = draw(st.sampled_from(["smart", "max_side", "max_pixels", "max_pixels_plain", "identity", "crop"]))
    if rule == "crop":  # a zoom crop: any (fractional) window of the original, shown at any size
        W, H = draw(sides), draw(sides)
        l, r = sorted(draw(st.floats(0, W)) for _ in range(2))
        t, b = sorted(draw(st.floats(0, H)) for _ in range(2))
        assume(r - l >= 1e-3 and b - t >= 1e-3)
        return Frame.crop(W, H, (l, t, r, b), (draw(st.integers(1, 1000)), draw(st.integers(1, 1000))))
    if rule == "max_side":
        W, H = draw(sides), draw(sides)
        return Frame.max_side(W, H, draw(st.integers(1, 4000)))
    if rule == "max_pixels_plain":
        W, H = draw(sides), draw(sides)
        return Frame.max_pixels(W, H, draw(st.integers(1, 20_000_000)), factor=None)
    if rule == "identity":
        return Frame.identity(draw(sides), draw(sides))
    W, H = draw(qwen_sizes())
    if rule == "max_pixels":
        return Frame.max_pixels(W, H, draw(st.integers(28 * 28, 20_000_000)))
    max_pixels = draw(st.integers(28 * 28, 20_000_000))
    min_pixels = draw(st.integers(28 * 28, max_pixels))
    return Frame.smart_resize(W, H, min_pixels=min_pixels, max_pixels=max_pixels)


@st.composite
def frame_and_original_pixel(draw):
    """A frame and an original pixel whose centre it shows (every pixel, for a full frame)."""
    f = draw(frames())
    left, top, right, bottom = f.window
    x_lo, x_hi = math.ceil(left - 0.5), math.floor(right - 0.5)
    y_lo, y_hi = math.ceil(top - 0.5), math.floor(bottom - 0.5)
    assume(x_lo <= x_hi and y_lo <= y_hi)
    return f, (draw(st.integers(x_lo, x_hi)), draw(st.integers(y_lo, y_hi)))


@st.composite
def frame_and_shown_pixel(draw):
    f = draw(frames())
    w, h = f.size
    return f, (draw(st.integers(0, w - 1)), draw(st.integers(0, h - 1)))


def _orig_roundtrip_bound(s: float) -> int:
    """Tight bound for original -> shown -> original with integer shown points: exact when the model sees at least
    the original resolution (s <= 1), else half a shown pixel in original pixels, floor(0.5 + s/2)."""
    return 0 if s <= 1 else math.floor(0.5 + s / 2)


# ---------------------------------------------------------------------------------------------------------------------
# Constructors, against values derived by hand
# ---------------------------------------------------------------------------------------------------------------------

def test_identity_frame_maps_points_to_themselves():
    f = Frame.identity(1000, 800)
    assert f.is_identity
    assert f.to_original((0, 0)) == (0, 0)
    assert f.to_original((999, 799)) == (999, 799)
    assert f.from_original((123, 456)) == (123, 456)
    assert f.to_original((12.25, 3.5), exact=True) == (12.25, 3.5)


def test_smart_resize_frame_matches_hand_derivation():
    # 1000x800, max_pixels 200_000: rounding gives 1008x812 = 818_496 > 200_000, so beta = sqrt(800_000/200_000) = 2:
    # w = floor(500/28)*28 = 476, h = floor(400/28)*28 = 392.
    assert Frame.smart_resize(1000, 800, max_pixels=200_000).size == (476, 392)
    # Multi-turn linearizer (min 2.7 MP, max 2.85 MP) upscales: 1008x812 < 2.7e6, beta = sqrt(2.7e6/8e5) = 1.8371;
    # w = ceil(1837.1/28)*28 = 66*28 = 1848, h = ceil(1469.7/28)*28 = 53*28 = 1484 (2_742_432 px).
    f = Frame.smart_resize(1000, 800, min_pixels=2_700_000, max_pixels=2_850_000)
    assert f.size == (1848, 1484)
    assert 2_700_000 <= f.width * f.height <= 2_850_000


def test_smart_resize_defaults_are_qwen_vl_utils_defaults():
    # fetch_image's crop resize: smart_resize(S, S) with MIN 3136 / MAX 16384*28*28: 512 -> 504, 384 -> 392, 672 -> 672.
    assert qwen_smart_size(512, 512) == (504, 504)
    assert qwen_smart_size(384, 384) == (392, 392)
    assert qwen_smart_size(672, 672) == (672, 672)
    # A tiny image is blown up to min_pixels: 10x10 -> ceil(10*5.6/28)*28 = 56.
    assert qwen_smart_size(10, 10) == (56, 56)


def test_max_side_truncates_each_axis_like_reference():
    # s = 1260/2000 = 0.63: int(2000*0.63) = 1260, int(1000*0.63) = 630.
    assert Frame.max_side(2000, 1000, 1260).size == (1260, 630)
    # int() truncates: 3 * (1000/1001) = 2.997 -> 2.
    assert Frame.max_side(1001, 3, 1000).size == (1000, 2)
    # Small enough already: identity, no rounding to 28.
    assert Frame.max_side(1260, 700, 1260).is_identity
    # Reference would make a 0-px side here and crash in PIL; kept at 1 px.
    assert Frame.max_side(5000, 1, 1260).size == (1260, 1)


def test_max_pixels_only_downscales_large_images():
    assert Frame.max_pixels(1000, 800, 800_000).is_identity  # w*h == max_pixels: not larger, untouched
    assert Frame.max_pixels(1001, 800, 12_960_000).is_identity


def test_max_pixels_smart_resizes_like_reference():
    # 4000x3000 > 1e6: beta = sqrt(12e6/1e6) = 3.4641; w = floor(1154.7/28)*28 = 41*28 = 1148,
    # h = floor(866.03/28)*28 = 30*28 = 840.
    f = Frame.max_pixels(4000, 3000, 1_000_000)
    assert f.size == (1148, 840)
    assert f.size == Frame.smart_resize(4000, 3000, max_pixels=1_000_000).size


def test_max_pixels_without_factor_keeps_aspect_exactly():
    # s = sqrt(1e6/12e6) = 0.288675: floor(4000*s) = 1154, floor(3000*s) = 866.
    assert Frame.max_pixels(4000, 3000, 1_000_000, factor=None).size == (1154, 866)


@FAST
@given(W=sides, H=sides, limit=st.integers(1, 20_000_000))
def test_max_pixels_without_factor_never_exceeds_limit(W, H, limit):
    f = Frame.max_pixels(W, H, limit, factor=None)
    assert f.width <= W and f.height <= H
    if W * H > limit and f.width > 1 and f.height > 1:
        assert f.width * f.height <= limit


def test_frame_rejects_inconsistent_fields():
    with pytest.raises(ValueError):
        Frame((100, 100), (50, 50), (0, 0, 50, 50), "full")  # a full frame shows the whole image
    with pytest.raises(ValueError):
        Frame.crop(100, 100, (10, 10, 120, 50), 28)  # window leaves the image
    with pytest.raises(ValueError):
        Frame.crop(100, 100, (10, 10, 10, 50), 28)  # empty window
    with pytest.raises(ValueError):
        Frame((0, 100), (10, 10), (0, 0, 0, 100))
    with pytest.raises(ValueError):
        Frame((100, 100), (10, 10), (0, 0, 100, 100), "zoom")


# ---------------------------------------------------------------------------------------------------------------------
# The rounding rule and round trips
# ---------------------------------------------------------------------------------------------------------------------

def test_integer_conversion_maps_pixel_centres():
    # 1000 px shown at 100 px: s = 10. Shown pixel 0 covers original [0, 10), centre 5 -> original pixel 5;
    # shown pixel 99 -> floor(99.5 * 10) = 995.
    f = Frame.resized(1000, 1000, 100, 100)
    assert f.to_original((0, 99)) == (5, 995)
    assert f.to_original((0, 99), exact=True) == (4.5, 994.5)
    # Back: original pixel 995 -> floor(995.5 / 10) = 99; original 9 -> floor(0.95) = 0; original 10 -> 1.
    assert f.from_original((995, 9)) == (99, 0)
    assert f.from_original((10, 0)) == (1, 0)
    # Upscaled view (s = 0.5): original pixel 3 covers shown pixels 6 and 7; its centre 3.5 -> shown 7.
    g = Frame.resized(10, 10, 20, 20)
    assert g.from_original((3, 3)) == (7, 7)
    assert g.to_original((6, 7)) == (3, 3)


def test_reference_scale_differs_by_at_most_one_pixel():
    # Reference GT rescale int(v*s) vs the pixel-centre rule floor((v + 0.5) * s), with s = 0.63:
    # v = 999: int(629.37) = 629 vs floor(629.685) = 629; v = 1: int(0.63) = 0 vs floor(0.945) = 0;
    # v = 100: int(63.0) = 63 vs floor(63.315) = 63; v = 73: int(45.99) = 45 vs floor(46.305) = 46 (one off).
    f = Frame.max_side(2000, 1000, 1260)
    assert (f.from_original((73, 0))[0], reference_scale(73, 0.63)) == (46, 45)
    for v in range(0, 2000, 7):
        assert abs(f.from_original((v, 0))[0] - reference_scale(v, 0.63)) <= 1


@FAST
@given(frame_and_original_pixel())
def test_original_model_original_round_trip_is_within_half_a_model_pixel(fp):
    f, (X, Y) = fp
    sx, sy = f.scale
    X2, Y2 = f.to_original(f.from_original((X, Y)))
    assert abs(X2 - X) <= _orig_roundtrip_bound(sx)
    assert abs(Y2 - Y) <= _orig_roundtrip_bound(sy)
    if sx < 3:  # the model sees at least a third of the original resolution: within 1 px
        assert abs(X2 - X) <= 1
    if sy < 3:
        assert abs(Y2 - Y) <= 1


@FAST
@given(frame_and_shown_pixel())
def test_model_original_model_round_trip_is_exact_for_downscaled_views(fp):
    f, (x, y) = fp
    sx, sy = f.scale
    x2, y2 = f.from_original(f.to_original((x, y)))
    # Roles swapped: exact when a shown pixel is at least an original pixel (s >= 1), else bounded by 1/s.
    assert abs(x2 - x) <= _orig_roundtrip_bound(1 / sx)
    assert abs(y2 - y) <= _orig_roundtrip_bound(1 / sy)


@FAST
@given(f=frames(), u=st.floats(0, 1), v=st.floats(0, 1))
def test_exact_round_trip_is_identity(f, u, v):
    left, top, right, bottom = f.window  # the window's extent in pixel-centre coordinates: [left - 0.5, right - 0.5]
    X, Y = left - 0.5 + u * (right - left), top - 0.5 + v * (bottom - top)
    x, y = f.from_original((X, Y), exact=True)
    X2, Y2 = f.to_original((x, y), exact=True)
    assert X2 == pytest.approx(X, abs=1e-6)
    assert Y2 == pytest.approx(Y, abs=1e-6)


@FAST
@given(frame_and_shown_pixel())
def test_integer_result_is_exact_result_rounded_half_up(fp):
    f, p = fp
    X, Y = f.to_original(p, exact=True)
    assert f.to_original(p) == (math.floor(X + 0.5), math.floor(Y + 0.5))


@FAST
@given(f=frames(), u=st.floats(0, 1), v=st.floats(0, 1))
def test_any_accepted_point_maps_to_a_pixel_of_the_other_image(f, u, v):
    # Includes the far edge x == w (accepted like the reference's `x > width` check) and fractional points.
    w, h = f.size
    left, top, right, bottom = f.window
    X, Y = f.to_original((u * w, v * h))
    assert math.floor(left) <= X < right and math.floor(top) <= Y < bottom
    x, y = f.from_original((left + u * (right - left), top + v * (bottom - top)))
    assert 0 <= x < w and 0 <= y < h


def test_far_edge_point_maps_to_last_pixel():
    f = Frame.resized(1000, 800, 500, 400)
    assert f.contains((500, 400))
    assert f.to_original((500, 400)) == (999, 799)
    assert f.from_original((1000, 800)) == (499, 399)


# ---------------------------------------------------------------------------------------------------------------------
# Points outside the image: explicit error kinds
# ---------------------------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("point", [(-1, 5), (5, -1), (501, 5), (5, 401), (10_000, 10_000)])
def test_point_outside_image_raises_explicit_kind(point):
    f = Frame.resized(1000, 800, 500, 400)
    assert not f.contains(point)
    assert check_point(point, f) == "point_outside_image"
    with pytest.raises(PointOutsideImage) as e:
        f.to_original(point)
    assert e.value.kind == "point_outside_image"
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("point", [(1, 2, 3), (1,), None, "12,3", (float("nan"), 1), (1, float("inf")), (True, 3)])
def test_malformed_point_raises_invalid_point(point):
    f = Frame.identity(100, 100)
    assert check_point(point, f) == "invalid_point"
    assert not f.contains(point)
    with pytest.raises(InvalidPoint) as e:
        f.to_original(point)
    assert e.value.kind == "invalid_point"
    with pytest.raises(InvalidPoint):
        f.from_original(point)


def test_check_point_accepts_points_inside():
    f = Frame.identity(100, 100)
    assert check_point((0, 0), f) is None
    assert check_point((100, 100), f) is None  # far edge, as the reference accepts
    assert check_point((50.5, 3), f) is None


def test_original_point_outside_crop_window_is_rejected():
    c = Frame.crop(1000, 800, (100, 100, 300, 300), 504)
    assert c.contains_original((200, 200))
    assert not c.contains_original((50, 200))
    with pytest.raises(PointOutsideImage):
        c.from_original((50, 200))
    # Unchecked conversion still works (e.g. to draw a far-away point off-canvas).
    assert c.from_original((50, 200), check=False)[0] < 0


def test_unchecked_conversion_does_not_clamp():
    f = Frame.resized(1000, 1000, 100, 100)
    assert f.to_original((-1, 100), check=False) == (-5, 1005)


# ---------------------------------------------------------------------------------------------------------------------
# Boxes
# ---------------------------------------------------------------------------------------------------------------------

def test_box_conversion_maps_corners():
    # s = 10: corners (100, 200) -> floor(100.5/10) = 10, floor(200.5/10) = 20; (149, 255) -> 14, 25.
    f = Frame.resized(1000, 1000, 100, 100)
    assert f.box_from_original((100, 200, 149, 255)) == (10, 20, 14, 25)
    # Back: shown 10 -> floor(105) = 105; 14 -> 145.
    assert f.box_to_original((10, 20, 14, 25)) == (105, 205, 145, 255)
    assert f.box_from_original((100, 200, 150, 250), exact=True) == pytest.approx((9.55, 19.55, 14.55, 24.55))


def test_box_partly_outside_image_is_clamped():
    f = Frame.resized(1000, 1000, 100, 100)
    assert f.box_from_original((-20, 990, 5, 1010)) == (0, 99, 0, 99)


@pytest.mark.parametrize("box", [(1, 2, 3), (5, 5, 4, 6), (0, 0, float("nan"), 3), "0,0,1,1"])
def test_malformed_box_raises_invalid_box(box):
    with pytest.raises(InvalidBox) as e:
        Frame.identity(10, 10).box_from_original(box)
    assert e.value.kind == "invalid_box"


@FAST
@given(f=frames(), data=st.data())
def test_point_inside_box_stays_inside_mapped_box(f, data):
    assume(f.kind == "full")
    W, H = f.original_size
    x1, x2 = sorted(data.draw(st.integers(0, W - 1)) for _ in range(2))
    y1, y2 = sorted(data.draw(st.integers(0, H - 1)) for _ in range(2))
    X, Y = data.draw(st.integers(x1, x2)), data.draw(st.integers(y1, y2))
    bx1, by1, bx2, by2 = f.box_from_original((x1, y1, x2, y2))
    x, y = f.from_original((X, Y))
    assert bx1 <= x <= bx2 and by1 <= y <= by2


# ---------------------------------------------------------------------------------------------------------------------
# Crop frames, serialisation, images
# ---------------------------------------------------------------------------------------------------------------------

def test_crop_frame_maps_crop_pixels_into_its_window():
    # A 200x200 window at (100, 100) shown at 504: s = 200/504. Crop pixel 0 -> floor(100 + 0.5*0.3968) = 100;
    # crop pixel 503 -> floor(100 + 503.5*0.3968) = floor(299.8) = 299.
    c = Frame.crop(1000, 800, (100, 100, 300, 300), 504)
    assert c.to_original((0, 0)) == (100, 100)
    assert c.to_original((503, 503)) == (299, 299)
    assert c.from_original((200, 200)) == (253, 253)  # floor(100.5 * 2.52) = 253


def test_map_to_goes_from_crop_to_full_view():
    full = Frame.resized(1000, 800, 500, 400)                      # s = 2
    crop = Frame.crop(1000, 800, (200, 200, 400, 400), 504)       # the shown window (100, 100, 200, 200)
    # Crop centre pixel 252 -> original 200 + 252.5 * 200/504 - 0.5 = 299.7
    # -> shown (299.7 + 0.5) / 2 - 0.5 = 149.6 -> 150.
    assert crop.map_to((252, 252), full) == (150, 150)
    with pytest.raises(ValueError):
        crop.map_to((0, 0), Frame.identity(10, 10))


@FAST
@given(frames())
def test_frame_dict_round_trip_is_json_safe(f):
    d = json.loads(json.dumps(f.to_dict()))
    assert d["kind"] in ("full", "crop")
    assert Frame.from_dict(d) == f


def test_crop_frame_dict_keeps_fractional_window():
    c = Frame.crop(1000, 800, (10.5, 20.25, 300, 400), (392, 392))
    d = json.loads(json.dumps(c.to_dict()))
    assert d == {"kind": "crop", "original_size": [1000, 800], "size": [392, 392], "window": [10.5, 20.25, 300, 400]}
    assert Frame.from_dict(d) == c
    with pytest.raises(ValueError):
        Frame.from_dict({"kind": "crop", "size": [1, 1]})


def test_resize_image_produces_the_shown_image():
    img = Image.linear_gradient("L").convert("RGB").resize((300, 200))
    f = Frame.max_pixels(300, 200, 20_000)
    out = resize_image(img, f)
    assert out.size == f.size and out.mode == "RGB"
    assert out.tobytes() == img.resize(f.size, Image.Resampling.BICUBIC).tobytes()  # PIL default resample
    same = resize_image(img, Frame.identity(300, 200))
    assert same is not img and same.tobytes() == img.tobytes()
    with pytest.raises(ValueError):
        resize_image(img, Frame.identity(30, 20))


def test_resize_image_composites_transparency_on_white():
    rgba = Image.new("RGBA", (4, 4), (255, 0, 0, 0))
    assert resize_image(rgba, Frame.identity(4, 4)).getpixel((1, 1)) == (255, 255, 255)


def test_resize_image_of_crop_frame_resamples_the_window():
    img = Image.new("RGB", (100, 100), (0, 0, 0))
    img.paste((255, 255, 255), (50, 0, 100, 100))
    out = resize_image(img, Frame.crop(100, 100, (50, 0, 100, 100), 28))
    assert out.size == (28, 28) and out.getpixel((14, 14)) == (255, 255, 255)
