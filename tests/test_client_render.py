"""Client rendering helpers (needs pillow + matplotlib; no server)."""
import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import vis_client  # noqa: F401
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "clients" / "python"))

pytest.importorskip("matplotlib")
Image = pytest.importorskip("PIL.Image")

from vis_client import render  # noqa: E402

RNG = np.random.default_rng(1)


def _read(path):
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


@pytest.mark.parametrize("n, rows, cols", [(1, 1, 1), (2, 1, 2), (5, 2, 3), (9, 3, 3), (10, 3, 4), (64, 8, 8)])
def test_grid_shape(n, rows, cols):
    assert render.grid_shape(n) == (rows, cols)


def test_feature_map_grid(tmp_path):
    act = RNG.standard_normal((10, 7, 5)).astype(np.float32)
    path = tmp_path / "sub" / "maps.png"
    img = render.feature_map_grid(act, path)
    rows, cols = 3, 4
    assert img.dtype == np.uint8
    assert img.shape == (rows * 7 + rows - 1, cols * 5 + cols - 1, 3)
    # separators are white, tiles are colour-mapped (per-map normalization spans the colormap)
    assert (img[7, :] == render.SEPARATOR).all() and (img[:, 5] == render.SEPARATOR).all()
    np.testing.assert_array_equal(_read(path), img)
    # the two unused cells of the last row stay separator-coloured
    assert (img[2 * 8:, 2 * 6:] == render.SEPARATOR).all()


def test_feature_map_grid_options():
    act = RNG.random((1, 100, 4, 4))
    assert render.feature_map_grid(act, max_maps=64).shape == (8 * 4 + 7, 8 * 4 + 7, 3)
    assert render.feature_map_grid(act[0, :3], upscale=3).shape == (2 * 12 + 1, 2 * 12 + 1, 3)
    flat = render.feature_map_grid(np.zeros((2, 3, 3)), normalize="global")  # constant maps: no NaNs
    assert flat.shape == (3, 7, 3)
    assert render.feature_map_grid(act[0, 0]).shape == (4, 4, 3)
    with pytest.raises(ValueError):
        render.feature_map_grid(RNG.random((2, 3, 4, 4)))
    with pytest.raises(ValueError):
        render.feature_map_grid(act[0], normalize="bogus")


def test_rgb_filter_grid(tmp_path):
    w = RNG.standard_normal((6, 3, 5, 5))
    img = render.rgb_filter_grid(w, tmp_path / "f.png", upscale=4)
    rows, cols = 2, 3
    assert img.shape == (rows * 20 + 1, cols * 20 + 2, 3)
    assert _read(tmp_path / "f.png").shape == img.shape
    # symmetric normalization: 0 -> mid grey, the largest |w| of each filter hits 0 or 255
    z = np.zeros((1, 3, 2, 2))
    z[0, 0, 0, 0] = 2.0
    z[0, 1, 1, 1] = -1.0
    tile = render.rgb_filter_grid(z, upscale=1)
    assert tile[0, 0, 0] == 255 and tile[1, 1, 1] == 64 and tile[1, 0, 2] == 128
    with pytest.raises(ValueError):
        render.rgb_filter_grid(RNG.standard_normal((4, 2, 3, 3)))


def test_channel_filter_grid(tmp_path):
    w = RNG.standard_normal((40, 20, 3, 3))
    img = render.channel_filter_grid(w, tmp_path / "c.png", max_out=32, max_in=16, upscale=2)
    assert img.shape == (32 * 6 + 31, 16 * 6 + 15, 3)
    assert (img[..., 0] == img[..., 1]).all()  # grey tiles
    assert _read(tmp_path / "c.png").shape == img.shape
    small = render.channel_filter_grid(w[:2, :3], upscale=1)
    assert small.shape == (2 * 3 + 1, 3 * 3 + 2, 3)


def test_weight_matrix_image():
    assert render.weight_matrix_image(RNG.standard_normal((10, 30))).shape == (10, 30, 3)


def test_heatmap_overlay(tmp_path):
    img = (RNG.random((48, 64, 3)) * 255).astype(np.uint8)
    heat = RNG.random((12, 16))
    plain = render.heatmap_overlay(img, heat, tmp_path / "h.png", colorbar=False)
    assert plain.shape == img.shape and plain.dtype == np.uint8
    np.testing.assert_array_equal(_read(tmp_path / "h.png"), plain)
    assert (render.heatmap_overlay(img, heat, alpha=0.0, colorbar=False) == img).all()

    bar = render.heatmap_overlay(img, heat, tmp_path / "hb.png", label="|grad|")
    k = bar.shape[0] // img.shape[0]
    assert bar.shape[0] == k * img.shape[0] and k >= 1 and bar.shape[1] > k * img.shape[1]
    assert _read(tmp_path / "hb.png").shape == bar.shape
    # the overlay itself sits unchanged (enlarged k times) at the left
    np.testing.assert_array_equal(bar[::k, : k * img.shape[1]:k], plain)

    big = render.heatmap_overlay(np.zeros((200, 100, 3), np.uint8), np.ones((200, 100)))
    assert big.shape[0] == 200


def test_save_png(tmp_path):
    p = render.save_png(RNG.random((5, 6)), tmp_path / "a" / "g.png")
    with Image.open(p) as im:
        assert im.size == (6, 5) and im.mode == "L"
    with pytest.raises(ValueError):
        render.save_png(np.zeros((2, 2, 5)), tmp_path / "bad.png")


def test_grey_filter_grid_is_a_near_square_grid_of_upscaled_patches(tmp_path):
    w = RNG.standard_normal((16, 1, 3, 3))
    w[0] = 0.0
    img = render.grey_filter_grid(w, tmp_path / "g.png", upscale=5)
    assert img.shape == (4 * 15 + 3, 4 * 15 + 3, 3)
    assert np.array_equal(_read(tmp_path / "g.png"), img)
    assert (img[:15, :15] == 128).all()  # an all-zero filter is mid-grey
    k = np.unravel_index(np.abs(w[1, 0]).argmax(), (3, 3))  # each filter's largest magnitude is black or white
    assert img[k[0] * 5, 16 + k[1] * 5, 0] in (0, 255)
    assert render.grey_filter_grid(w, upscale=1).shape == (15, 15, 3)
    with pytest.raises(ValueError, match=r"\[O, 1, kh, kw\]"):
        render.grey_filter_grid(RNG.standard_normal((4, 3, 3, 3)))


def test_unknown_colormap_is_a_value_error():
    with pytest.raises(ValueError, match="unknown matplotlib colormap 'viridys'"):
        render.colorize(np.zeros((2, 2)), "viridys")


def test_overlay_of_a_non_image_says_what_it_got(tmp_path):
    """A path string where an image array belongs: a ValueError naming it, not an AttributeError."""
    with pytest.raises(ValueError, match="got a str"):
        render.heatmap_overlay("digit.png", np.zeros((4, 4)), tmp_path / "x.png")

