"""Masks read by an explicit rule: the strict automatic rule, foreground=[...] / colours / threshold,
palette, alpha, 16-bit and JPEG masks, and images of any bit depth; on real files in tmp dirs."""
from __future__ import annotations

import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from pyunlearn.data import ImageMaskFolder, Threshold
from pyunlearn.data._io import (
    JPEG_TOLERANCE,
    binarise_mask,
    load_image,
    load_mask,
    parse_foreground,
    read_image_array,
)

H, W = 12, 16


def lesion(h: int = H, w: int = W) -> np.ndarray:
    """A bool ellipse in the middle."""
    yy, xx = np.mgrid[0:h, 0:w]
    return ((yy - h / 2) / (h / 3)) ** 2 + ((xx - w / 2) / (w / 3)) ** 2 <= 1


def save(path: Path, arr: np.ndarray, **kwargs) -> Path:
    Image.fromarray(arr).save(path, **kwargs)
    return path


def folder(tmp: Path, mask: Image.Image | np.ndarray, name: str = "a.png") -> tuple[Path, Path]:
    """images/a.png (random RGB) + masks/<name>; returns the two folders."""
    img_dir, mask_dir = tmp / "images", tmp / "masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    rng = np.random.default_rng(0)
    save(img_dir / "a.png", rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8))
    (mask if isinstance(mask, Image.Image) else Image.fromarray(mask)).save(mask_dir / name)
    return img_dir, mask_dir


# ----------------------------------------------------------------------------------------------
# automatic rule: unambiguous masks
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("m", "dtype"), [(1, np.uint8), (2, np.uint8), (100, np.uint8), (255, np.uint8),
                                          (65535, np.uint16), (1000, np.uint16)])
def test_two_value_masks_read_automatically(tmp_path: Path, m: int, dtype) -> None:
    fg = lesion()
    path = save(tmp_path / "m.png", (fg * m).astype(dtype))
    if dtype == np.uint16:
        assert Image.open(path).mode.startswith("I")  # really stored with 16 bits
    np.testing.assert_array_equal(load_mask(path).numpy(), fg)
    # {m} alone is all foreground, {0} alone all background
    save(tmp_path / "full.png", np.full((H, W), m, dtype=dtype))
    save(tmp_path / "empty.png", np.zeros((H, W), dtype=dtype))
    assert load_mask(tmp_path / "full.png").all() and not load_mask(tmp_path / "empty.png").any()


def test_bool_float_and_grey_rgb_masks(tmp_path: Path) -> None:
    fg = lesion()
    Image.fromarray(fg).save(tmp_path / "b.png")  # mode "1"
    assert Image.open(tmp_path / "b.png").mode == "1"
    np.testing.assert_array_equal(load_mask(tmp_path / "b.png").numpy(), fg)
    Image.fromarray(fg.astype(np.float32), mode="F").save(tmp_path / "f.tif")
    np.testing.assert_array_equal(load_mask(tmp_path / "f.tif").numpy(), fg)
    grey_rgb = np.repeat((fg * 255).astype(np.uint8)[..., None], 3, axis=2)  # R = G = B
    np.testing.assert_array_equal(load_mask(save(tmp_path / "g.png", grey_rgb)).numpy(), fg)
    assert binarise_mask(fg).tolist() == fg.tolist()
    assert binarise_mask(fg, [0]).tolist() == (~fg).tolist()  # bool masks obey explicit values


@pytest.mark.parametrize("mode", ["L", "RGB"])
def test_jpeg_noise_on_0_255_mask(tmp_path: Path, mode: str) -> None:
    fg = lesion(48, 64)
    img = Image.fromarray((fg * 255).astype(np.uint8)).convert(mode)
    img.save(tmp_path / "m.jpg", quality=70)
    raw = np.asarray(Image.open(tmp_path / "m.jpg"))
    assert len(np.unique(raw)) > 2  # really noisy
    got = load_mask(tmp_path / "m.jpg").numpy()
    assert (got == fg).mean() > 0.97 and got.sum() > 0.9 * fg.sum()
    # the same noisy values in a lossless file are not guessed at
    grey = raw if raw.ndim == 2 else raw[..., 0]
    save(tmp_path / "m.png", grey)
    with pytest.raises(ValueError, match=r"m\.png is ambiguous: values \["):
        load_mask(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png", foreground={"threshold": 127}).sum() > 0


def test_jpeg_noise_tolerance_is_exact(tmp_path: Path) -> None:
    """Values within JPEG_TOLERANCE of 0/255 pass; one value just outside makes the JPEG ambiguous."""
    ok = np.array([[0, JPEG_TOLERANCE, 255 - JPEG_TOLERANCE, 255]], dtype=np.uint8)
    assert binarise_mask(ok, lossy=True).tolist() == [[False, False, True, True]]
    bad = np.array([[0, JPEG_TOLERANCE + 1, 255]], dtype=np.uint8)
    with pytest.raises(ValueError, match=rf"values \[0, {JPEG_TOLERANCE + 1}, 255\].*JPEG noise"):
        binarise_mask(bad, lossy=True, source="mask x.jpg")
    # all near 0 with no value near 255 (a noisy 0/1 mask?) is refused, not read as empty
    with pytest.raises(ValueError, match="ambiguous"):
        binarise_mask(np.array([[0, 1, 3]], dtype=np.uint8), lossy=True)


# ----------------------------------------------------------------------------------------------
# automatic rule: ambiguous masks are errors naming the file and the values
# ----------------------------------------------------------------------------------------------
def test_label_map_is_an_error_and_explicit_values_work(tmp_path: Path) -> None:
    labels = np.zeros((H, W), dtype=np.uint8)
    labels[2:5, 2:6], labels[6:9, 3:8], labels[8:11, 10:14] = 1, 2, 3
    img_dir, mask_dir = folder(tmp_path, labels)
    ds = ImageMaskFolder(img_dir, mask_dir)  # construction lists files only
    with pytest.raises(ValueError, match=r"mask .*masks/a\.png is ambiguous: values \[0, 1, 2, 3\] "
                                         r"\(a label map.*foreground=\[\.\.\.\].*threshold"):
        ds[0]
    all_fg = ImageMaskFolder(img_dir, mask_dir, foreground=[1, 2, 3])[0]["fine"].numpy()
    np.testing.assert_array_equal(all_fg, labels > 0)
    only2 = ImageMaskFolder(img_dir, mask_dir, foreground=[2])[0]["fine"].numpy()
    np.testing.assert_array_equal(only2, labels == 2)
    assert ImageMaskFolder(img_dir, mask_dir, foreground=2)[0]["fine"].sum() == (labels == 2).sum()
    thr = ImageMaskFolder(img_dir, mask_dir, foreground={"threshold": 1})[0]["fine"].numpy()
    np.testing.assert_array_equal(thr, labels > 1)


def test_stray_pixel_is_an_error_not_a_lost_lesion(tmp_path: Path) -> None:
    fg = lesion().astype(np.uint8)
    fg[0, 0] = 2
    path = save(tmp_path / "stray.png", fg)
    with pytest.raises(ValueError, match=r"stray\.png is ambiguous: values \[0, 1, 2\]"):
        load_mask(path)
    got = load_mask(path, foreground=[1, 2]).numpy()
    assert got.sum() == (fg > 0).sum() and got[H // 2, W // 2]


def test_red_on_black_rgb(tmp_path: Path) -> None:
    fg = lesion()
    rgb = np.zeros((H, W, 3), dtype=np.uint8)
    rgb[fg] = (255, 0, 0)
    path = save(tmp_path / "red.png", rgb)
    with pytest.raises(ValueError, match=r"red\.png is ambiguous: a coloured \(RGB\) mask with colours "
                                         r"\[0, 0, 0\], \[255, 0, 0\].*foreground=\[\[255, 0, 0\]\]"):
        load_mask(path)
    with pytest.raises(ValueError, match=r"red\.png is a coloured.*plain values.*foreground=\[\[255, 0, 0\]\]"):
        load_mask(path, foreground=[255])
    np.testing.assert_array_equal(load_mask(path, foreground=[[255, 0, 0]]).numpy(), fg)
    np.testing.assert_array_equal(load_mask(path, foreground={"threshold": 127}).numpy(), fg)
    assert not load_mask(path, foreground=[[0, 255, 0]]).any()  # green: nowhere
    with pytest.raises(ValueError, match="single-channel.*colours"):
        load_mask(save(tmp_path / "grey.png", fg.astype(np.uint8) * 255), foreground=[[255, 255, 255]])


def test_palette_with_void_border(tmp_path: Path) -> None:
    idx = np.zeros((H, W), dtype=np.uint8)
    idx[lesion()] = 1
    idx[0, :], idx[-1, :], idx[:, 0], idx[:, -1] = 255, 255, 255, 255
    img = Image.fromarray(idx, mode="P")
    pal = [0, 0, 0, 128, 0, 0] + [0, 0, 0] * 253 + [224, 224, 192]  # VOC-like colours
    img.putpalette(pal)
    img.save(tmp_path / "p.png")
    assert Image.open(tmp_path / "p.png").mode == "P"
    with pytest.raises(ValueError, match=r"p\.png is ambiguous: values \[0, 1, 255\] \(255 is often a void"):
        load_mask(tmp_path / "p.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "p.png", foreground=[1]).numpy(), idx == 1)
    # palette indices, not colours, are compared: a plain 0/1 palette mask reads automatically
    Image.fromarray((idx == 1).astype(np.uint8), mode="P").save(tmp_path / "q.png")
    np.testing.assert_array_equal(load_mask(tmp_path / "q.png").numpy(), idx == 1)


def test_alpha_channel_mask(tmp_path: Path) -> None:
    fg = lesion()
    rgba = np.zeros((H, W, 4), dtype=np.uint8)
    rgba[..., 3] = fg * 255  # black everywhere, the lesion opaque
    np.testing.assert_array_equal(load_mask(save(tmp_path / "a.png", rgba)).numpy(), fg)
    la = np.stack([np.full((H, W), 7, np.uint8), fg.astype(np.uint8) * 255], axis=2)
    np.testing.assert_array_equal(load_mask(save(tmp_path / "la.png", la)).numpy(), fg)
    # alpha constant: the colour carries the mask
    rgba[..., 3] = 255
    rgba[fg, :3] = 255
    np.testing.assert_array_equal(load_mask(save(tmp_path / "b.png", rgba)).numpy(), fg)
    # colour and alpha both vary: refused automatically, explicit rules read the colour
    rgba[..., 3] = np.where(fg, 128, 0)
    rgba[..., :3] = 0
    rgba[fg, 0] = 255
    path = save(tmp_path / "c.png", rgba)
    with pytest.raises(ValueError, match=r"c\.png is ambiguous: both its colour and its alpha"):
        load_mask(path)
    np.testing.assert_array_equal(load_mask(path, foreground=[[255, 0, 0]]).numpy(), fg)


def test_non_finite_float_mask_names_the_file(tmp_path: Path) -> None:
    arr = lesion().astype(np.float32)
    arr[3, 4] = np.nan
    Image.fromarray(arr, mode="F").save(tmp_path / "nan.tif")
    for fg in (None, {"threshold": 0.5}, [1]):
        with pytest.raises(ValueError, match=r"nan\.tif contains 1 non-finite value"):
            load_mask(tmp_path / "nan.tif", foreground=fg)
    soft = lesion().astype(np.float32) * 0.8 + 0.1
    Image.fromarray(soft, mode="F").save(tmp_path / "soft.tif")
    with pytest.raises(ValueError, match=r"soft\.tif is ambiguous: values \[0\.1.*probability"):
        load_mask(tmp_path / "soft.tif")
    np.testing.assert_array_equal(load_mask(tmp_path / "soft.tif", foreground=Threshold(0.5)).numpy(),
                                  lesion())


# ----------------------------------------------------------------------------------------------
# images of any bit depth
# ----------------------------------------------------------------------------------------------
def test_16_bit_greyscale_image_is_not_collapsed(tmp_path: Path) -> None:
    yy, xx = np.mgrid[0:40, 0:50]
    arr = (1000 + 2000 * (yy * 50 + xx) / (40 * 50 - 1)).astype(np.uint16)  # 1000..3000
    path = save(tmp_path / "ct.png", arr)
    assert Image.open(path).mode.startswith("I;16")
    img = load_image(path)
    assert img.shape == (3, 40, 50) and img.dtype == torch.float32
    assert len(torch.unique(img[0])) > 1000  # many distinct levels, not two
    assert img.min().item() == 0.0 and img.max().item() == 1.0  # own min..max
    assert torch.equal(img[0], img[2])
    expected = (arr.astype(np.float64) - arr.min()) / (arr.max() - arr.min())
    np.testing.assert_allclose(img[0].numpy(), expected, atol=1e-6)
    small = load_image(path, size=(10, 12))
    assert small.shape == (3, 10, 12) and 0 <= small.min() and small.max() <= 1
    assert len(torch.unique(small[0])) > 50
    # constant image: no division by zero
    const = load_image(save(tmp_path / "c.png", np.full((4, 5), 1234, np.uint16)))
    assert torch.isfinite(const).all() and (const == 0).all()
    # 8-bit images keep the /255 scaling (absolute brightness)
    dim = read_image_array(save(tmp_path / "dim.png", np.full((4, 5), 51, np.uint8)))
    assert dim.dtype == np.uint8 and load_image(tmp_path / "dim.png").max().item() == pytest.approx(0.2)


def test_float_and_int32_images(tmp_path: Path) -> None:
    f = np.linspace(-3.0, 5.0, 60, dtype=np.float32).reshape(6, 10)
    Image.fromarray(f, mode="F").save(tmp_path / "f.tif")
    img = load_image(tmp_path / "f.tif")
    assert img.min().item() == 0.0 and img.max().item() == 1.0 and len(torch.unique(img)) == 60
    f[0, 0] = np.inf
    Image.fromarray(f, mode="F").save(tmp_path / "g.tif")
    with pytest.raises(ValueError, match=r"g\.tif contains 1 non-finite"):
        load_image(tmp_path / "g.tif")
    i32 = (np.arange(60, dtype=np.int32).reshape(6, 10) * 100000)
    Image.fromarray(i32, mode="I").save(tmp_path / "i.tif")
    assert len(torch.unique(load_image(tmp_path / "i.tif"))) == 60


def test_16_bit_image_through_the_folder_loader(tmp_path: Path) -> None:
    img_dir, mask_dir = tmp_path / "images", tmp_path / "masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    save(img_dir / "a.png", np.arange(H * W, dtype=np.uint16).reshape(H, W) * 16 + 500)
    save(mask_dir / "a.png", lesion().astype(np.uint8) * 100)
    item = ImageMaskFolder(img_dir, mask_dir, size=(6, 8))[0]
    assert item["image"].shape == (3, 6, 8) and item["fine"].shape == (6, 8)
    assert len(torch.unique(item["image"])) > 10 and item["fine"].any()


# ----------------------------------------------------------------------------------------------
# the foreground option
# ----------------------------------------------------------------------------------------------
def test_parse_foreground_accepts_toml_forms() -> None:
    cfg = tomllib.loads("a = [1, 2]\nb = {threshold = 127}\nc = 3\nd = [[255, 0, 0]]\ne = {threshold = 0.5}")
    assert parse_foreground(cfg["a"]).values == (1, 2) and parse_foreground(cfg["a"]).kind == "values"
    assert parse_foreground(cfg["b"]).threshold == 127.0 and parse_foreground(cfg["b"]).kind == "threshold"
    assert parse_foreground(cfg["c"]).values == (3,)
    assert parse_foreground(cfg["d"]).values == ((255, 0, 0),) and parse_foreground(cfg["d"]).kind == "colours"
    assert parse_foreground(cfg["e"]) == parse_foreground(Threshold(0.5))
    assert parse_foreground(None).kind == "auto"
    assert parse_foreground((np.int64(4),)).values == (4,)


@pytest.mark.parametrize(
    ("spec", "exc", "match"),
    [
        (True, TypeError, "foreground must be None"),
        ("255", TypeError, "foreground must be None"),
        (1.5, TypeError, "foreground must be None"),
        ([], ValueError, "must not be an empty list"),
        ([-1], ValueError, "must be >= 0"),
        ([1, 1], ValueError, "duplicates"),
        ([1, 2.0], TypeError, r"all be ints .*float 2\.0 \(for a cut-off use"),
        ([1, [2, 3, 4]], TypeError, "all be ints or all be"),
        ([[255, 0]], ValueError, r"\[R, G, B\] triples"),
        ([[256, 0, 0]], ValueError, "0..255"),
        ({"thresh": 3}, ValueError, "exactly one key 'threshold'"),
        ({"threshold": 3, "values": [1]}, ValueError, "exactly one key"),
        ({"threshold": "127"}, TypeError, "threshold must be a number"),
        ({"threshold": float("nan")}, ValueError, "threshold must be finite"),
        ({"threshold": True}, TypeError, "threshold must be a number"),
    ],
)
def test_parse_foreground_errors(spec, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        parse_foreground(spec)


def test_loaders_validate_foreground_at_construction(tmp_path: Path) -> None:
    from fixtures_isic import make_isic_folder

    from pyunlearn.data import ISIC2018

    img_dir, mask_dir = folder(tmp_path, lesion().astype(np.uint8))
    with pytest.raises(ValueError, match="empty list"):
        ImageMaskFolder(img_dir, mask_dir, foreground=[])
    root = make_isic_folder(tmp_path / "isic", n=3)
    with pytest.raises(TypeError, match="foreground"):
        ISIC2018(root, foreground="all")
    with pytest.warns(UserWarning, match="dropped 1"):
        ds = ISIC2018(root, foreground=[255])
    assert "foreground=[255]" in repr(ds) and ds[0]["fine"].any()
