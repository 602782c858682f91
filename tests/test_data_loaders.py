"""ISIC2018 / ImageMaskFolder loaders and the shared image IO helpers, on real files in tmp dirs."""
from __future__ import annotations

import csv
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from fixtures_isic import (
    ARTEFACT_COLUMNS,
    ARTEFACTS_CSV,
    CLASSES,
    EXTRA_LABEL_ID,
    IMAGE_DIR,
    LABELS_CSV,
    MASK_DIR,
    isic_id,
    make_isic_folder,
    unlabelled_id,
)
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from torch.utils.data import DataLoader

from pyunlearn.data._io import binarise_mask, load_image, load_mask, read_csv
from pyunlearn.data.folders import ImageMaskFolder
from pyunlearn.data.isic import ISIC2018

N, H, W = 6, 40, 30  # fixture defaults: 6 images of 40 x 30 (H x W), the last one unlabelled


def isic(root: Path, **kwargs) -> ISIC2018:
    """ISIC2018 on a fixture folder, asserting the expected 'dropped 1 of N' warning."""
    with pytest.warns(UserWarning, match=rf"dropped 1 of {N} images .*no row in the labels CSV"):
        return ISIC2018(root, **kwargs)


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def write_rows(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    return make_isic_folder(tmp_path / "isic", n=N, size=(H, W), seed=3)


@pytest.fixture(scope="module")
def shared_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A read-only fixture folder for the Hypothesis tests."""
    return make_isic_folder(tmp_path_factory.mktemp("isic"), n=N, size=(H, W), seed=5)


# ----------------------------------------------------------------------------------------------
# ISIC2018: contents
# ----------------------------------------------------------------------------------------------
def test_isic_items_match_files(root: Path) -> None:
    ds = isic(root, artefacts_csv=ARTEFACTS_CSV, size=None)
    expected_ids = [isic_id(i) for i in range(N - 1)]
    assert ds.ids == expected_ids and len(ds) == N - 1
    assert ds.artefact_names == list(ARTEFACT_COLUMNS)
    labels = {r["image"]: int(float(r["MEL"])) for r in read_rows(root / LABELS_CSV)}
    flags = {r["image"]: [float(r[c]) for c in ARTEFACT_COLUMNS]
             for r in read_rows(root / ARTEFACTS_CSV)}
    for k, item in enumerate(ds):
        i = expected_ids[k]
        assert set(item) == {"image", "fine", "has_fine", "label", "artefacts", "id"}
        assert item["has_fine"].dtype == torch.bool and item["has_fine"].item()
        assert item["id"] == i
        img = item["image"]
        assert img.dtype == torch.float32 and img.shape == (3, H, W)
        assert 0.0 <= img.min() and img.max() <= 1.0
        rgb = np.asarray(Image.open(root / IMAGE_DIR / f"{i}.jpg").convert("RGB"))
        np.testing.assert_allclose(img.permute(1, 2, 0).numpy(), rgb / 255.0, atol=1e-6)
        png = np.asarray(Image.open(root / MASK_DIR / f"{i}_segmentation.png"))
        assert item["fine"].dtype == torch.bool and item["fine"].shape == (H, W)
        assert torch.equal(item["fine"], torch.from_numpy(png == 255))
        assert 0 < item["fine"].sum() < H * W  # a lesion, not an empty / full mask
        assert item["label"].dtype == torch.int64 and item["label"].shape == ()
        assert item["label"].item() == labels[i]
        assert item["artefacts"].dtype == torch.float32
        assert item["artefacts"].tolist() == flags[i]
    assert ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == [labels[i] for i in expected_ids]
    assert ds.labels[:2].tolist() == [1, 0]  # fixture: first labelled MEL, second NV
    assert ds.artefacts.tolist() == [flags[i] for i in expected_ids]


def test_isic_intersection_warning_names_dropped_id(root: Path) -> None:
    with pytest.warns(UserWarning) as record:
        ds = ISIC2018(root)
    messages = [str(w.message) for w in record]
    assert len(messages) == 1
    assert f"dropped 1 of {N}" in messages[0] and unlabelled_id(N) in messages[0]
    assert unlabelled_id(N) not in ds.ids and EXTRA_LABEL_ID not in ds.ids


def test_isic_ignores_txt_and_hidden_files(root: Path) -> None:
    (root / IMAGE_DIR / ".DS_Store").write_bytes(b"\x00\x01")
    (root / IMAGE_DIR / "._ISIC_0000000.jpg").write_bytes(b"\x00\x01")  # macOS resource fork
    ds = isic(root)
    assert all(i.startswith("ISIC_") and not i.startswith("._") for i in ds.ids)
    assert "ATTRIBUTION" not in ds.ids and "LICENSE" not in ds.ids
    assert (root / IMAGE_DIR / "ATTRIBUTION.txt").exists()


def test_isic_without_artefacts_gives_empty_vector(tmp_path: Path) -> None:
    root = make_isic_folder(tmp_path, n=N, size=(H, W), with_artefacts=False)
    assert not (root / ARTEFACTS_CSV).exists()
    ds = isic(root, size=(9, 11))
    item = ds[0]
    assert item["artefacts"].shape == (0,) and item["artefacts"].dtype == torch.float32
    assert ds.artefact_names == [] and ds.artefacts.shape == (N - 1, 0)
    batch = next(iter(DataLoader(ds, batch_size=2)))
    assert batch["artefacts"].shape == (2, 0)


def test_isic_artefact_column_subset_and_positive_classes(root: Path) -> None:
    ds = isic(root, artefacts_csv=ARTEFACTS_CSV, artefact_columns=("ruler", "hair"),
              positive_classes=("MEL", "BCC", "VASC"))
    rows = {r["image"]: r for r in read_rows(root / LABELS_CSV)}
    art = {r["image"]: r for r in read_rows(root / ARTEFACTS_CSV)}
    assert ds.artefact_names == ["ruler", "hair"]
    for k, i in enumerate(ds.ids):
        want = int(any(float(rows[i][c]) == 1.0 for c in ("MEL", "BCC", "VASC")))
        assert ds.labels[k].item() == want
        assert ds.artefacts[k].tolist() == [float(art[i]["ruler"]), float(art[i]["hair"])]


def test_isic_accepts_id_aliases_extensions_and_absolute_csv(root: Path) -> None:
    # ISIC 2017 Part 3 style: image_id column, other class names, ids with a file extension.
    labels = root.parent / "isic2017_part3.csv"
    write_rows(labels, ["image_id", "melanoma", "seborrheic_keratosis"],
               [[f"{isic_id(i)}.jpg", str(float(i % 2)), "0.0"] for i in range(N)])
    art = root.parent / "bissoto.csv"
    write_rows(art, ["isic_id", "hair", "ink"], [[isic_id(i), "1", "0"] for i in range(N)])
    ds = ISIC2018(root, labels_csv=labels, positive_classes="melanoma", artefacts_csv=art)
    assert len(ds) == N  # every image has a label row now: no warning, nothing dropped
    assert ds.labels.tolist() == [i % 2 for i in range(N)]
    assert ds.artefact_names == ["hair", "ink"]
    assert ds[N - 1]["artefacts"].tolist() == [1.0, 0.0]


def test_isic_images_missing_from_artefact_csv_are_dropped(root: Path) -> None:
    rows = read_rows(root / ARTEFACTS_CSV)
    write_rows(root / ARTEFACTS_CSV, list(rows[0]), [list(r.values()) for r in rows[1:]])
    with pytest.warns(UserWarning) as record:
        ds = ISIC2018(root, artefacts_csv=ARTEFACTS_CSV)
    messages = " | ".join(str(w.message) for w in record)
    assert "artefacts CSV" in messages and isic_id(0) in messages
    assert ds.ids == [isic_id(i) for i in range(1, N - 1)]


# ----------------------------------------------------------------------------------------------
# ISIC2018: resizing, batching, coarse masks
# ----------------------------------------------------------------------------------------------
@given(h=st.integers(1, 53), w=st.integers(1, 53), index=st.integers(0, N - 2))
def test_isic_resize_shapes_and_ranges(shared_root: Path, h: int, w: int, index: int) -> None:
    with pytest.warns(UserWarning):
        ds = ISIC2018(shared_root, size=(h, w))
    item = ds[index]
    assert item["image"].shape == (3, h, w) and item["image"].dtype == torch.float32
    assert 0.0 <= item["image"].min() and item["image"].max() <= 1.0
    assert item["fine"].shape == (h, w) and item["fine"].dtype == torch.bool


def test_isic_resize_native_is_identity_and_int_size_is_square(root: Path) -> None:
    native, same = isic(root, size=None)[2], isic(root, size=(H, W))[2]
    assert torch.equal(native["image"], same["image"]) and torch.equal(native["fine"], same["fine"])
    assert isic(root, size=17)[0]["fine"].shape == (17, 17)


def test_isic_mask_resize_is_nearest(root: Path) -> None:
    """Exact 2x upsampling with nearest neighbour repeats every mask pixel in a 2 x 2 block."""
    native, up = isic(root, size=None)[1], isic(root, size=(2 * H, 2 * W))[1]
    rep = native["fine"].repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)
    assert torch.equal(up["fine"], rep)
    # Bilinear image: the mean colour is kept up to interpolation error.
    assert torch.allclose(up["image"].mean(dim=(1, 2)), native["image"].mean(dim=(1, 2)), atol=0.02)
    down = isic(root, size=(13, 7))[1]["fine"]
    assert set(down.unique().tolist()) <= {False, True} and down.any()


def test_isic_dataloader_default_collate(root: Path) -> None:
    ds = isic(root, artefacts_csv=ARTEFACTS_CSV, size=(21, 19))
    batches = list(DataLoader(ds, batch_size=2, shuffle=False))
    assert [len(b["id"]) for b in batches] == [2, 2, 1]
    b = batches[0]
    assert b["image"].shape == (2, 3, 21, 19) and b["image"].dtype == torch.float32
    assert b["fine"].shape == (2, 21, 19) and b["fine"].dtype == torch.bool
    assert b["label"].shape == (2,) and b["label"].dtype == torch.int64
    assert b["artefacts"].shape == (2, len(ARTEFACT_COLUMNS))
    assert b["id"] == ds.ids[:2]
    assert torch.cat([x["label"] for x in batches]).tolist() == ds.labels.tolist()


@pytest.mark.parametrize("mode", ["dilate", "bbox"])
def test_isic_coarse_mask(root: Path, mode: str) -> None:
    masks = pytest.importorskip("pyunlearn.masks")
    ds = isic(root, size=(23, 17), coarse_radius=2, coarse_mode=mode)
    item = ds[0]
    coarse, fine = item["coarse"], item["fine"]
    assert coarse.dtype == torch.bool and coarse.shape == fine.shape == (23, 17)
    assert torch.equal(coarse & fine, fine) and coarse.sum() > fine.sum()
    assert torch.equal(coarse, masks.coarsen(fine, radius=2, mode=mode))
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["coarse"].shape == (3, 23, 17)


# ----------------------------------------------------------------------------------------------
# ISIC2018: errors
# ----------------------------------------------------------------------------------------------
def test_isic_missing_root_and_folders(root: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nowhere"):
        ISIC2018(root / "nowhere")
    with pytest.raises(FileNotFoundError, match="Task1_Ground"):
        ISIC2018(root, mask_dir="Task1_GroundTruth_typo")
    (root / IMAGE_DIR).rename(root / "moved")
    with pytest.raises(FileNotFoundError, match=IMAGE_DIR):
        ISIC2018(root)


def test_isic_missing_labels_csv(root: Path) -> None:
    (root / LABELS_CSV).unlink()
    with pytest.raises(FileNotFoundError, match="ISIC2018_Task3_Training_GroundTruth.csv"):
        ISIC2018(root)


def test_isic_missing_mask_names_the_id(root: Path) -> None:
    (root / MASK_DIR / f"{isic_id(2)}_segmentation.png").unlink()
    with pytest.raises(ValueError, match=rf"no mask .*{isic_id(2)}"):
        ISIC2018(root)


def test_isic_truncated_jpeg_names_the_file(root: Path) -> None:
    path = root / IMAGE_DIR / f"{isic_id(1)}.jpg"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = isic(root)  # construction only lists files
    ds[0]  # the others still load
    with pytest.raises(ValueError, match=f"{isic_id(1)}.jpg"):
        ds[1]


def test_isic_garbage_image_and_mask_name_the_file(root: Path) -> None:
    (root / IMAGE_DIR / f"{isic_id(0)}.jpg").write_bytes(b"not a jpeg at all")
    (root / MASK_DIR / f"{isic_id(3)}_segmentation.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"x" * 9)
    ds = isic(root)
    with pytest.raises(ValueError, match=rf"image file .*{isic_id(0)}\.jpg"):
        ds[0]
    with pytest.raises(ValueError, match=rf"mask file .*{isic_id(3)}_segmentation\.png"):
        ds[3]


def test_isic_mask_size_mismatch_names_both_files(root: Path) -> None:
    Image.new("L", (W + 1, H)).save(root / MASK_DIR / f"{isic_id(2)}_segmentation.png")
    ds = isic(root, size=(16, 16))  # resizing must not hide the mismatch
    with pytest.raises(ValueError, match=rf"{isic_id(2)}_segmentation\.png.*{isic_id(2)}\.jpg"):
        ds[2]


def test_isic_labels_csv_missing_columns(root: Path) -> None:
    path = root / LABELS_CSV
    rows = read_rows(path)
    write_rows(path, ["image", "NV"], [[r["image"], r["NV"]] for r in rows])
    with pytest.raises(ValueError, match=r"ISIC2018_Task3_Training_GroundTruth\.csv.*'MEL'"):
        ISIC2018(root)
    with pytest.raises(ValueError, match=r"missing column.*'BCC'"):
        ISIC2018(root, positive_classes=("NV", "BCC"))
    write_rows(path, ["filename", "MEL"], [[r["image"], r["MEL"]] for r in rows])
    with pytest.raises(ValueError, match=r"no image id column.*image_id"):
        ISIC2018(root)


@pytest.mark.parametrize("bad", ["0.5", "yes", "", "2"])
def test_isic_labels_csv_non_binary_value(root: Path, bad: str) -> None:
    path = root / LABELS_CSV
    rows = read_rows(path)
    rows[2]["MEL"] = bad
    write_rows(path, list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(ValueError, match=rf"\.csv, line 4 \(id '{rows[2]['image']}'\): column 'MEL'"):
        ISIC2018(root)


def test_isic_labels_csv_duplicate_id(root: Path) -> None:
    path = root / LABELS_CSV
    rows = read_rows(path)
    write_rows(path, list(rows[0]), [list(r.values()) for r in rows + rows[:1]])
    with pytest.raises(ValueError, match=rf"duplicate image id '{rows[0]['image']}'"):
        ISIC2018(root)


def test_isic_artefact_csv_errors(root: Path) -> None:
    path = root / ARTEFACTS_CSV
    rows = read_rows(path)
    with pytest.raises(ValueError, match=rf"{ARTEFACTS_CSV}.*missing column.*'tattoo'"):
        ISIC2018(root, artefacts_csv=ARTEFACTS_CSV, artefact_columns=["hair", "tattoo"])
    rows[1]["ruler"] = "2"
    write_rows(path, list(rows[0]), [list(r.values()) for r in rows])
    with pytest.raises(ValueError, match=rf"{ARTEFACTS_CSV}, line 3 .*'ruler' must be 0 or 1"):
        ISIC2018(root, artefacts_csv=ARTEFACTS_CSV)
    with pytest.warns(UserWarning):  # the bad column is not requested: fine
        ds = ISIC2018(root, artefacts_csv=ARTEFACTS_CSV, artefact_columns=["hair"])
    assert ds.artefact_names == ["hair"]
    write_rows(path, ["name", *ARTEFACT_COLUMNS], [list(r.values()) for r in rows])
    with pytest.raises(ValueError, match=rf"{ARTEFACTS_CSV} has no image id column"):
        ISIC2018(root, artefacts_csv=ARTEFACTS_CSV)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        ISIC2018(root, artefacts_csv="missing.csv")


def test_isic_empty_data_set(root: Path) -> None:
    write_rows(root / LABELS_CSV, ["image", *CLASSES], [[EXTRA_LABEL_ID, "1", *["0"] * 6]])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="empty data set"):
        ISIC2018(root)
    for p in (root / IMAGE_DIR).glob("*.jpg"):
        p.unlink()
    with pytest.raises(ValueError, match=rf"no image files .*{IMAGE_DIR}"):
        ISIC2018(root)


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        ({"size": (0, 5)}, ValueError, "size must be positive"),
        ({"size": (5, 5, 5)}, TypeError, "size must be"),
        ({"size": (5.0, 5)}, TypeError, "size must contain ints"),
        ({"size": True}, TypeError, "size must be"),
        ({"coarse_mode": "blur"}, ValueError, "coarse_mode must be one of"),
        ({"coarse_radius": -1}, ValueError, "coarse_radius must be >= 0"),
        ({"coarse_radius": 1.5}, TypeError, "coarse_radius must be None or an int"),
        ({"artefact_columns": ["hair"]}, ValueError, "artefacts_csv is None"),
        ({"positive_classes": ()}, ValueError, "positive_classes must not be empty"),
        ({"positive_classes": ["MEL", 3]}, TypeError, "positive_classes must contain str"),
        ({"image_dir": 7}, TypeError, "image_dir must be a str or os.PathLike"),
    ],
)
def test_isic_bad_arguments(root: Path, kwargs: dict, exc: type, match: str) -> None:
    with pytest.raises(exc, match=match):
        ISIC2018(root, **kwargs)


def test_isic_bad_root_type_and_indexing(root: Path) -> None:
    with pytest.raises(TypeError, match="root must be"):
        ISIC2018(None)  # type: ignore[arg-type]
    ds = isic(root)
    assert ds[-1]["id"] == ds.ids[-1]
    assert ds[np.int64(1)]["id"] == ds.ids[1]
    with pytest.raises(IndexError, match="out of range"):
        ds[len(ds)]
    with pytest.raises(TypeError, match="index must be an int"):
        ds["ISIC_0000000"]


# ----------------------------------------------------------------------------------------------
# ImageMaskFolder
# ----------------------------------------------------------------------------------------------
def make_folder(tmp: Path, size: tuple[int, int] = (11, 14)) -> tuple[Path, Path, dict[str, np.ndarray]]:
    """images/ {a.png, b.jpg, c.bmp, README.txt}; masks/ {a_mask.png, b_segmentation.png (0/255),
    c.tif (0/1 values)}. Returns the folders and the expected bool masks by stem."""
    rng = np.random.default_rng(0)
    img_dir, mask_dir = tmp / "images", tmp / "masks"
    img_dir.mkdir()
    mask_dir.mkdir()
    (img_dir / "README.txt").write_text("not an image")
    expected = {}
    for stem, ext, mask_name, scale in [("a", ".png", "a_mask.png", 255),
                                        ("b", ".jpg", "b_segmentation.png", 255),
                                        ("c", ".bmp", "c.tif", 1)]:
        Image.fromarray(rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)).save(img_dir / (stem + ext))
        mask = rng.random(size) < 0.4
        Image.fromarray(mask.astype(np.uint8) * scale).save(mask_dir / mask_name)
        expected[stem] = mask
    return img_dir, mask_dir, expected


def test_folder_suffix_matching_and_items(tmp_path: Path) -> None:
    img_dir, mask_dir, expected = make_folder(tmp_path)
    ds = ImageMaskFolder(img_dir, mask_dir)
    assert ds.ids == ["a", "b", "c"] and ds.labels.tolist() == [-1, -1, -1]
    assert ds.artefact_names == []
    a_rgb = np.asarray(Image.open(img_dir / "a.png"))
    for item in ds:
        assert item["image"].shape == (3, 11, 14) and item["fine"].dtype == torch.bool
        assert torch.equal(item["fine"], torch.from_numpy(expected[item["id"]]))
        assert item["artefacts"].shape == (0,) and item["label"].item() == -1
    np.testing.assert_array_equal((ds[0]["image"] * 255).round().byte().permute(1, 2, 0).numpy(), a_rgb)
    batch = next(iter(DataLoader(ds, batch_size=3)))
    assert batch["fine"].shape == (3, 11, 14) and batch["id"] == ["a", "b", "c"]


def test_folder_resize_and_custom_suffix(tmp_path: Path) -> None:
    img_dir, mask_dir, expected = make_folder(tmp_path)
    (mask_dir / "a_mask.png").rename(mask_dir / "a_gt.PNG")
    with pytest.raises(ValueError, match=r"1 image\(s\) .*have no mask.*'a'"):
        ImageMaskFolder(img_dir, mask_dir)
    suffixes = ("_gt", "_segmentation", "")
    native = ImageMaskFolder(img_dir, mask_dir, mask_suffixes=suffixes)
    assert torch.equal(native[0]["fine"], torch.from_numpy(expected["a"]))
    ds = ImageMaskFolder(img_dir, mask_dir, mask_suffixes=suffixes, size=(5, 9))
    assert ds[0]["image"].shape == (3, 5, 9) and ds[2]["fine"].shape == (5, 9)


def test_folder_labels_csv(tmp_path: Path) -> None:
    img_dir, mask_dir, _ = make_folder(tmp_path)
    labels = tmp_path / "labels.csv"
    write_rows(labels, ["image", "label"], [["a.png", "1"], ["c", "0"], ["zzz", "1"]])
    with pytest.warns(UserWarning, match=r"dropped 1 of 3 images .*labels.csv: b"):
        ds = ImageMaskFolder(img_dir, mask_dir, labels_csv=labels)
    assert ds.ids == ["a", "c"] and ds.labels.tolist() == [1, 0]
    assert ds[1]["label"].dtype == torch.int64 and ds[1]["label"].item() == 0
    write_rows(labels, ["image", "target"], [["a", "1"]])
    with pytest.raises(ValueError, match=r"labels.csv is missing column.*'label'"):
        ImageMaskFolder(img_dir, mask_dir, labels_csv=labels)
    write_rows(labels, ["image", "label"], [["a", "-1"], ["b", "0"], ["c", "0"]])
    with pytest.raises(ValueError, match=r"labels.csv, line 2 \(id 'a'\).*non-negative integer"):
        ImageMaskFolder(img_dir, mask_dir, labels_csv=labels)
    write_rows(labels, ["image", "label"], [["x", "1"]])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="empty data set"):
        ImageMaskFolder(img_dir, mask_dir, labels_csv=labels)


def test_folder_errors(tmp_path: Path) -> None:
    img_dir, mask_dir, _ = make_folder(tmp_path)
    with pytest.raises(ValueError, match="different folders"):
        ImageMaskFolder(img_dir, img_dir)
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageMaskFolder(img_dir, tmp_path / "nope")
    with pytest.raises(ValueError, match="mask_suffixes must not be empty"):
        ImageMaskFolder(img_dir, mask_dir, mask_suffixes=())
    Image.new("L", (14, 11)).save(mask_dir / "a.png")  # now a.png and a_mask.png both match
    with pytest.raises(ValueError, match=r"a\.png matches several masks.*'a_mask\.png'"):
        ImageMaskFolder(img_dir, mask_dir)
    (mask_dir / "a.png").unlink()
    (mask_dir / "b_segmentation.png").unlink()
    with pytest.raises(ValueError, match=r"no mask.*'b'"):
        ImageMaskFolder(img_dir, mask_dir)


def test_folder_empty_images_folder(tmp_path: Path) -> None:
    (tmp_path / "i").mkdir()
    (tmp_path / "m").mkdir()
    (tmp_path / "i" / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="no image files"):
        ImageMaskFolder(tmp_path / "i", tmp_path / "m")


# ----------------------------------------------------------------------------------------------
# _io helpers
# ----------------------------------------------------------------------------------------------
@given(arr=arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9))),
       thr=st.integers(0, 254))
def test_load_mask_threshold_property(arr: np.ndarray, thr: int) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "m.png"
        Image.fromarray(arr).save(path)
        got = load_mask(path, foreground={"threshold": thr}).numpy()
        u = np.unique(arr)
        if len(u) == 1 or (len(u) == 2 and u[0] == 0):  # unambiguous: read automatically
            np.testing.assert_array_equal(load_mask(path).numpy(), arr == u[-1] if u[-1] else arr > 0)
        else:
            with pytest.raises(ValueError, match=r"m\.png is ambiguous: values \["):
                load_mask(path)
    np.testing.assert_array_equal(got, arr > thr)


@given(arr=arrays(np.uint8, st.tuples(st.integers(1, 9), st.integers(1, 9), st.just(3))))
def test_load_image_png_round_trip(arr: np.ndarray) -> None:
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "x.png"
        Image.fromarray(arr).save(path)
        got = load_image(path)
    assert got.shape == (3, *arr.shape[:2]) and got.dtype == torch.float32
    np.testing.assert_array_equal((got * 255).round().to(torch.uint8).permute(1, 2, 0).numpy(), arr)


def test_binarise_mask_cases() -> None:
    assert binarise_mask(np.array([[0, 1]], dtype=np.uint8)).tolist() == [[False, True]]
    with pytest.raises(ValueError, match=r"ambiguous: values \[3, 128, 250\]"):
        binarise_mask(np.array([[3, 128, 250]], dtype=np.uint8))
    assert binarise_mask(np.array([[3, 128, 250]], dtype=np.uint8),
                         {"threshold": 127}).tolist() == [[False, True, True]]
    assert binarise_mask(np.array([[0, 65535]], dtype=np.uint16)).tolist() == [[False, True]]
    with pytest.raises(ValueError, match="soft / probability mask"):
        binarise_mask(np.array([[0.2, 0.7]], dtype=np.float32))
    assert binarise_mask(np.array([[0.2, 0.7]], dtype=np.float32),
                         {"threshold": 0.5}).tolist() == [[False, True]]
    with pytest.raises(ValueError, match="non-finite"):
        binarise_mask(np.array([[np.nan]]))


def test_load_mask_colour_and_grey_image_inputs(tmp_path: Path) -> None:
    rgb_mask = np.zeros((4, 5, 3), dtype=np.uint8)
    rgb_mask[1:3, 2:4] = 255
    Image.fromarray(rgb_mask).save(tmp_path / "m.png")
    assert load_mask(tmp_path / "m.png").numpy().tolist() == (rgb_mask[..., 0] == 255).tolist()
    Image.fromarray(rgb_mask[..., 0]).save(tmp_path / "g.png")  # greyscale image -> RGB copy
    img = load_image(tmp_path / "g.png")
    assert img.shape == (3, 4, 5) and torch.equal(img[0], img[2])


def test_read_csv_tolerates_bom_whitespace_and_blank_lines(tmp_path: Path) -> None:
    path = tmp_path / "x.csv"
    path.write_bytes("\ufeffimage , MEL\n\nISIC_1 , 1.0 \n".encode())
    header, rows = read_csv(path, what="labels CSV")
    assert header == ["image", "MEL"] and rows == [(3, {"image": "ISIC_1", "MEL": "1.0"})]
    path.write_text("image,MEL\nISIC_1,1,0\n")
    with pytest.raises(ValueError, match=r"x\.csv, line 2: 3 cells"):
        read_csv(path, what="labels CSV")
    path.write_text("")
    with pytest.raises(ValueError, match=r"x\.csv is empty"):
        read_csv(path, what="labels CSV")
    path.write_text("image,MEL,MEL\n")
    with pytest.raises(ValueError, match=r"duplicate columns \['MEL'\]"):
        read_csv(path, what="labels CSV")
