"""CoarseFineFolder: images/ + coarse/ (every image) + fine/ (a subset) + optional CSVs, on real
files in tmp dirs; and ISIC2018 with given coarse masks (coarse_dir=)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from pyunlearn.data import CoarseFineFolder

H, W = 10, 14
STEMS = ("a", "b", "c", "d")
WITH_FINE = ("a", "c")
KEYS = {"image", "coarse", "fine", "has_fine", "label", "artefacts", "id"}


def write_rows(path: Path, header: list[str], rows: list[list]) -> Path:
    with open(path, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def box(y0: int, y1: int, x0: int, x1: int) -> np.ndarray:
    m = np.zeros((H, W), dtype=bool)
    m[y0:y1, x0:x1] = True
    return m


def make_folder(tmp: Path) -> dict:
    """images/{a,b,c,d}.png, coarse/<stem>_coarse.png (0/255 boxes), fine/{a,c}.png (0/1 boxes
    inside); returns folders and the expected arrays."""
    rng = np.random.default_rng(1)
    dirs = {k: tmp / k for k in ("images", "coarse", "fine")}
    for d in dirs.values():
        d.mkdir()
    (dirs["images"] / "notes.txt").write_text("ignored")
    out: dict = {"dirs": dirs, "image": {}, "coarse": {}, "fine": {}}
    for k, stem in enumerate(STEMS):
        rgb = rng.integers(0, 256, size=(H, W, 3), dtype=np.uint8)
        Image.fromarray(rgb).save(dirs["images"] / f"{stem}.png")
        coarse = box(1 + k % 2, 9, 2, 12)
        Image.fromarray(coarse.astype(np.uint8) * 255).save(dirs["coarse"] / f"{stem}_coarse.png")
        fine = box(3, 7, 4 + k, 10)
        if stem in WITH_FINE:
            Image.fromarray(fine.astype(np.uint8)).save(dirs["fine"] / f"{stem}.png")
        out["image"][stem], out["coarse"][stem] = rgb, coarse
        out["fine"][stem] = fine if stem in WITH_FINE else np.zeros((H, W), bool)
    return out


@pytest.fixture
def data(tmp_path: Path) -> dict:
    return make_folder(tmp_path)


def ds_of(data: dict, **kwargs) -> CoarseFineFolder:
    d = data["dirs"]
    return CoarseFineFolder(d["images"], d["coarse"], d["fine"], **kwargs)


# ----------------------------------------------------------------------------------------------
# contents
# ----------------------------------------------------------------------------------------------
def test_items_match_the_files(data: dict) -> None:
    ds = ds_of(data)
    assert len(ds) == 4 and ds.ids == list(STEMS)
    assert ds.has_fine.dtype == torch.bool and ds.has_fine.tolist() == [s in WITH_FINE for s in STEMS]
    assert ds.labels.tolist() == [-1] * 4 and ds.labels.dtype == torch.int64
    assert ds.artefacts.shape == (4, 0) and ds.artefact_names == []
    for stem, item in zip(STEMS, ds):
        assert set(item) == KEYS and item["id"] == stem
        assert item["image"].dtype == torch.float32 and item["image"].shape == (3, H, W)
        np.testing.assert_array_equal((item["image"] * 255).round().byte().permute(1, 2, 0).numpy(),
                                      data["image"][stem])
        for k in ("coarse", "fine"):
            assert item[k].dtype == torch.bool and item[k].shape == (H, W)
            np.testing.assert_array_equal(item[k].numpy(), data[k][stem])
        assert item["has_fine"].dtype == torch.bool and item["has_fine"].shape == ()
        assert item["has_fine"].item() == (stem in WITH_FINE)
        assert item["label"].dtype == torch.int64 and item["label"].item() == -1
        assert item["artefacts"].dtype == torch.float32 and item["artefacts"].shape == (0,)
        assert not (item["fine"] & ~item["coarse"]).any()
    assert ds[-1]["id"] == "d" and ds[np.int64(2)]["id"] == "c"
    with pytest.raises(IndexError, match="out of range"):
        ds[4]
    with pytest.raises(TypeError, match="index must be an int"):
        ds["a"]


def test_without_fine_folder_every_fine_mask_is_empty(data: dict) -> None:
    d = data["dirs"]
    ds = CoarseFineFolder(d["images"], d["coarse"])
    assert not ds.has_fine.any()
    item = ds[0]
    assert not item["fine"].any() and item["coarse"].any() and not item["has_fine"].item()


def test_labels_and_artefacts_csv(data: dict, tmp_path: Path) -> None:
    labels = write_rows(tmp_path / "labels.csv", ["image_id", "label"],
                        [["a.png", 1], ["b", 0], ["c", 2], ["zzz", 1]])
    arte = write_rows(tmp_path / "artefacts.csv", ["image", "ruler", "hair"],
                      [["a", 1, 0], ["b", 0, 1], ["d", 1, 1]])
    with pytest.warns(UserWarning) as record:
        ds = ds_of(data, labels_csv=labels, artefacts_csv=arte)
    messages = " ".join(str(w.message) for w in record)
    assert "dropped 1 of 4 images that have no row in the labels CSV" in messages
    assert "labels.csv: d" in messages and "artefacts.csv: c" in messages
    assert ds.ids == ["a", "b"] and ds.labels.tolist() == [1, 0]
    assert ds.artefact_names == ["ruler", "hair"] and ds.artefacts.tolist() == [[1, 0], [0, 1]]
    assert ds.has_fine.tolist() == [True, False]
    assert ds[1]["artefacts"].tolist() == [0.0, 1.0] and ds[0]["label"].item() == 1
    with pytest.warns(UserWarning):
        sub = ds_of(data, artefacts_csv=arte, artefact_columns=["hair"])
    assert sub.artefact_names == ["hair"] and sub.artefacts.tolist() == [[0], [1], [1]]
    with pytest.raises(ValueError, match="artefacts_csv is None"):
        ds_of(data, artefact_columns=["hair"])
    write_rows(arte, ["image", "ruler"], [["a", 2]])
    with pytest.raises(ValueError, match=r"artefacts.csv, line 2 \(id 'a'\): column 'ruler' must be 0 or 1"):
        ds_of(data, artefacts_csv=arte)
    write_rows(labels, ["image", "label"], [["nobody", 1]])
    with pytest.warns(UserWarning), pytest.raises(ValueError, match="empty data set.*labels CSV"):
        ds_of(data, labels_csv=labels)


def test_resize_batches_and_keeps_fine_inside_coarse(data: dict) -> None:
    ds = ds_of(data, size=(7, 5))
    batch = next(iter(DataLoader(ds, batch_size=4)))
    assert batch["image"].shape == (4, 3, 7, 5) and batch["coarse"].shape == (4, 7, 5)
    assert batch["fine"].dtype == torch.bool and batch["has_fine"].tolist() == [True, False, True, False]
    assert batch["id"] == list(STEMS) and batch["label"].shape == (4,) and batch["artefacts"].shape == (4, 0)
    assert not (batch["fine"] & ~batch["coarse"]).any() and batch["fine"][0].any()
    assert ds_of(data, size=6)[0]["coarse"].shape == (6, 6)


def test_reading_is_lazy(data: dict, monkeypatch: pytest.MonkeyPatch) -> None:
    import pyunlearn.data.folders as folders

    calls: list[Path] = []
    real = folders.read_image_array
    monkeypatch.setattr(folders, "read_image_array", lambda p: calls.append(p) or real(p))
    ds = ds_of(data)
    ds.labels, ds.has_fine, ds.artefacts, ds.ids  # noqa: B018
    assert calls == []
    ds[2]
    assert [p.name for p in calls] == ["c.png"]


def test_explicit_foreground_applies_to_both_masks(data: dict) -> None:
    d = data["dirs"]
    labels = np.zeros((H, W), np.uint8)
    labels[1:9, 2:12] = 3
    labels[3:7, 4:10] = 2  # a label map: 2 = lesion, 3 = its surroundings
    Image.fromarray(labels).save(d["coarse"] / "a_coarse.png")
    with pytest.raises(ValueError, match=r"a_coarse\.png is ambiguous: values \[0, 2, 3\]"):
        ds_of(data)[0]
    item = ds_of(data, foreground=[1, 2, 3])[0]  # fine a.png is 0/1: value 1 is foreground too
    np.testing.assert_array_equal(item["coarse"].numpy(), labels > 0)
    np.testing.assert_array_equal(item["fine"].numpy(), data["fine"]["a"])


# ----------------------------------------------------------------------------------------------
# errors
# ----------------------------------------------------------------------------------------------
def test_truncated_and_corrupt_files_name_the_file(data: dict) -> None:
    d = data["dirs"]
    path = d["images"] / "b.png"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    (d["fine"] / "c.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"junk" * 4)
    ds = ds_of(data)  # construction only lists files
    ds[0], ds[3]  # noqa: B018 - the others still load
    with pytest.raises(ValueError, match=r"cannot read image file .*images/b\.png"):
        ds[1]
    with pytest.raises(ValueError, match=r"cannot read mask file .*fine/c\.png"):
        ds[2]


def test_size_mismatch_names_both_files(data: dict) -> None:
    d = data["dirs"]
    Image.new("L", (W + 1, H)).save(d["coarse"] / "b_coarse.png")
    Image.new("L", (W, H - 2)).save(d["fine"] / "c.png")
    ds = ds_of(data, size=(8, 8))  # resizing must not hide it
    with pytest.raises(ValueError, match=rf"coarse mask .*b_coarse\.png is \({H}, {W + 1}\).*images/b\.png"):
        ds[1]
    with pytest.raises(ValueError, match=rf"fine mask .*fine/c\.png is \({H - 2}, {W}\).*images/c\.png"):
        ds[2]


def test_fine_outside_coarse_names_the_file_and_counts_pixels(data: dict) -> None:
    d = data["dirs"]
    fine = data["fine"]["c"].copy()
    fine[0, 0] = fine[0, 1] = fine[H - 1, W - 1] = True  # three pixels outside c's coarse box
    Image.fromarray(fine.astype(np.uint8) * 255).save(d["fine"] / "c.png")
    ds = ds_of(data)
    with pytest.raises(ValueError, match=rf"fine mask .*fine/c\.png is not inside its coarse mask "
                                         rf".*c_coarse\.png: 3 of its {int(fine.sum())} foreground pixels"):
        ds[2]
    ds[0]


def test_missing_and_orphan_masks(data: dict) -> None:
    d = data["dirs"]
    (d["coarse"] / "b_coarse.png").unlink()
    with pytest.raises(ValueError, match=r"1 image\(s\) in .*images have no coarse mask .*'b'"):
        ds_of(data)
    Image.new("L", (W, H)).save(d["coarse"] / "b.png")
    Image.new("L", (W, H)).save(d["coarse"] / "zz.png")
    with pytest.raises(ValueError, match=r"1 coarse mask file\(s\) in .*coarse have no image .*'zz\.png'"):
        ds_of(data)
    (d["coarse"] / "zz.png").unlink()
    Image.new("L", (W, H)).save(d["fine"] / "e_fine.png")  # its image is missing
    with pytest.raises(ValueError, match=r"1 fine mask file\(s\) in .*fine have no image .*'e_fine\.png'"):
        ds_of(data)
    (d["fine"] / "e_fine.png").unlink()
    Image.new("L", (W, H)).save(d["fine"] / "a_fine.png")  # a.png and a_fine.png both match 'a'
    with pytest.raises(ValueError, match=r"images/a\.png matches several fine masks .*'a\.png', 'a_fine\.png'"):
        ds_of(data)


def test_bad_arguments(data: dict, tmp_path: Path) -> None:
    d = data["dirs"]
    with pytest.raises(ValueError, match="images and coarse must be different folders"):
        CoarseFineFolder(d["images"], d["images"])
    with pytest.raises(ValueError, match="coarse and fine must be different folders"):
        CoarseFineFolder(d["images"], d["coarse"], d["coarse"])
    with pytest.raises(FileNotFoundError, match="fine mask folder not found: .*nope"):
        CoarseFineFolder(d["images"], d["coarse"], tmp_path / "nope")
    with pytest.raises(TypeError, match="coarse must be a str or os.PathLike"):
        CoarseFineFolder(d["images"], 3)
    with pytest.raises(ValueError, match="mask_suffixes must not be empty"):
        ds_of(data, mask_suffixes=())
    with pytest.raises(ValueError, match="size must be positive"):
        ds_of(data, size=(0, 3))
    with pytest.raises(TypeError, match="foreground"):
        ds_of(data, foreground="lesion")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no image files"):
        CoarseFineFolder(tmp_path / "empty", d["coarse"])


# ----------------------------------------------------------------------------------------------
# ISIC2018 with given coarse masks
# ----------------------------------------------------------------------------------------------
def test_isic_given_coarse_masks(tmp_path: Path) -> None:
    from fixtures_isic import MASK_DIR, isic_id, make_isic_folder

    from pyunlearn.data import ISIC2018
    from pyunlearn.masks import coarsen

    root = make_isic_folder(tmp_path / "isic", n=4, size=(20, 16))
    cdir = root / "coarse"
    cdir.mkdir()
    for k in range(4):
        fine = np.asarray(Image.open(root / MASK_DIR / f"{isic_id(k)}_segmentation.png")) > 0
        coarse = coarsen(torch.from_numpy(fine), radius=2, mode="bbox").numpy()
        Image.fromarray(coarse.astype(np.uint8) * 255).save(cdir / f"{isic_id(k)}_coarse.png")
    with pytest.warns(UserWarning, match="dropped 1"):
        ds = ISIC2018(root, coarse_dir="coarse", size=None)
    item = ds[1]
    assert set(item) == KEYS and item["has_fine"].item() and ds.has_fine.all()
    want = np.asarray(Image.open(cdir / f"{isic_id(1)}_coarse.png")) > 0
    np.testing.assert_array_equal(item["coarse"].numpy(), want)
    assert not (item["fine"] & ~item["coarse"]).any() and item["coarse"].sum() > item["fine"].sum()
    with pytest.raises(ValueError, match="not both"):
        ISIC2018(root, coarse_dir="coarse", coarse_radius=2)
    Image.new("L", (16, 20)).save(cdir / f"{isic_id(2)}_coarse.png")  # empty: fine sticks out
    with pytest.warns(UserWarning):
        ds = ISIC2018(root, coarse_dir=cdir)
    with pytest.raises(ValueError, match=rf"{isic_id(2)}_segmentation\.png is not inside .*{isic_id(2)}_coarse"):
        ds[2]
    (cdir / f"{isic_id(0)}_coarse.png").unlink()
    with pytest.warns(UserWarning), pytest.raises(ValueError, match=rf"no coarse mask .*{isic_id(0)}"):
        ISIC2018(root, coarse_dir="coarse")


def test_a_mask_claimed_by_two_images_is_an_error(tmp_path: Path) -> None:
    for d in ("images", "coarse"):
        (tmp_path / d).mkdir()
    for stem in ("a", "a_mask"):
        Image.new("RGB", (W, H)).save(tmp_path / "images" / f"{stem}.png")
    Image.new("L", (W, H)).save(tmp_path / "coarse" / "a_mask.png")  # 'a' + '_mask' and 'a_mask' + ''
    with pytest.raises(ValueError, match=r"coarse mask file .*a_mask\.png matches two images, 'a' and 'a_mask'"):
        CoarseFineFolder(tmp_path / "images", tmp_path / "coarse")
    with pytest.raises(ValueError, match=r"have no coarse mask .*'a'"):  # without '_mask', 'a' has none
        CoarseFineFolder(tmp_path / "images", tmp_path / "coarse", mask_suffixes=("",))
