"""NiftiFolder: 3-D volumes (.nii.gz / .nii) with coarse masks for all and fine masks for some, on
tiny generated volumes in tmp dirs."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

nib = pytest.importorskip("nibabel")

from pyunlearn.data import NiftiFolder  # noqa: E402

D, H, W = 6, 8, 10
KEYS = {"image", "coarse", "fine", "has_fine", "label", "artefacts", "id"}
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def save(path: Path, arr: np.ndarray, affine: np.ndarray = AFFINE) -> Path:
    nib.Nifti1Image(arr, affine).to_filename(str(path))
    return path


def cube(d0: int, d1: int, h0: int, h1: int, w0: int, w1: int) -> np.ndarray:
    m = np.zeros((D, H, W), dtype=bool)
    m[d0:d1, h0:h1, w0:w1] = True
    return m


@pytest.fixture
def data(tmp_path: Path) -> dict:
    """images/{p1.nii.gz (int16 CT-like), p2.nii.gz (float32, 2 channels), p3.nii}; coarse/
    <id>_coarse.nii.gz (uint8 0/1) for all; fine/<id>.nii.gz (float 0.0/1.0) for p1 and p3."""
    rng = np.random.default_rng(0)
    dirs = {k: tmp_path / k for k in ("images", "coarse", "fine")}
    for d in dirs.values():
        d.mkdir()
    (dirs["images"] / "README.md").write_text("ignored")
    out: dict = {"dirs": dirs, "image": {}, "coarse": {}, "fine": {}}
    vols = {"p1": rng.integers(-1000, 3000, size=(D, H, W)).astype(np.int16),
            "p2": rng.normal(5, 2, size=(D, H, W, 2)).astype(np.float32),
            "p3": rng.integers(0, 4096, size=(D, H, W)).astype(np.uint16)}
    for k, (stem, vol) in enumerate(vols.items()):
        save(dirs["images"] / (f"{stem}.nii" if stem == "p3" else f"{stem}.nii.gz"), vol)
        coarse = cube(1, 5, 1 + k, 7, 2, 9)
        fine = cube(2, 4, 3, 6, 3 + k, 8)
        save(dirs["coarse"] / f"{stem}_coarse.nii.gz", coarse.astype(np.uint8))
        if stem != "p2":
            save(dirs["fine"] / f"{stem}.nii.gz", fine.astype(np.float32))
        out["image"][stem], out["coarse"][stem] = vol, coarse
        out["fine"][stem] = fine if stem != "p2" else np.zeros((D, H, W), bool)
    return out


def ds_of(data: dict, **kwargs) -> NiftiFolder:
    d = data["dirs"]
    return NiftiFolder(d["images"], d["coarse"], d["fine"], **kwargs)


def test_items_match_the_volumes(data: dict) -> None:
    ds = ds_of(data)
    assert ds.ids == ["p1", "p2", "p3"] and ds.has_fine.tolist() == [True, False, True]
    assert ds.labels.tolist() == [-1, -1, -1] and ds.artefacts.shape == (3, 0)
    for item in ds:
        stem = item["id"]
        assert set(item) == KEYS
        vol = data["image"][stem].astype(np.float64)
        channels = 2 if stem == "p2" else 1
        assert item["image"].dtype == torch.float32 and item["image"].shape == (channels, D, H, W)
        chans = np.moveaxis(vol, -1, 0) if vol.ndim == 4 else vol[None]
        for c in range(channels):  # each channel by its own min..max
            want = (chans[c] - chans[c].min()) / (chans[c].max() - chans[c].min())
            np.testing.assert_allclose(item["image"][c].numpy(), want, atol=1e-6)
            assert item["image"][c].min() == 0 and item["image"][c].max() == 1
        for k in ("coarse", "fine"):
            assert item[k].dtype == torch.bool and item[k].shape == (D, H, W)
            np.testing.assert_array_equal(item[k].numpy(), data[k][stem])
        assert item["has_fine"].dtype == torch.bool and item["has_fine"].item() == (stem != "p2")
        assert item["label"].dtype == torch.int64 and item["artefacts"].dtype == torch.float32


def test_resize_and_batch(data: dict) -> None:
    d = data["dirs"]
    ds = NiftiFolder(d["images"], d["coarse"], d["fine"], size=(3, 4, 5))
    item = ds[0]
    assert item["image"].shape == (1, 3, 4, 5) and item["coarse"].shape == (3, 4, 5)
    assert 0 <= item["image"].min() and item["image"].max() <= 1
    assert not (item["fine"] & ~item["coarse"]).any() and item["fine"].any()
    batch = next(iter(DataLoader(torch.utils.data.Subset(ds, [0, 2]), batch_size=2)))
    assert batch["image"].shape == (2, 1, 3, 4, 5) and batch["fine"].shape == (2, 3, 4, 5)
    assert batch["has_fine"].tolist() == [True, True] and batch["id"] == ["p1", "p3"]
    assert NiftiFolder(d["images"], d["coarse"], size=4)[1]["image"].shape == (2, 4, 4, 4)


def test_csvs_accept_nifti_ids(data: dict, tmp_path: Path) -> None:
    labels = tmp_path / "labels.csv"
    with open(labels, "w", newline="") as fh:
        csv.writer(fh).writerows([["image", "label"], ["p1.nii.gz", 1], ["p2", 0], ["p3.nii", 1]])
    arte = tmp_path / "artefacts.csv"
    with open(arte, "w", newline="") as fh:
        csv.writer(fh).writerows([["image_id", "motion"], ["p1", 1], ["p3", 0]])
    with pytest.warns(UserWarning, match="dropped 1 of 3 .*artefacts.csv: p2"):
        ds = ds_of(data, labels_csv=labels, artefacts_csv=arte)
    assert ds.ids == ["p1", "p3"] and ds.labels.tolist() == [1, 1]
    assert ds.artefact_names == ["motion"] and ds[0]["artefacts"].tolist() == [1.0]


def test_label_map_masks_need_a_rule(data: dict) -> None:
    d = data["dirs"]
    labels = data["coarse"]["p1"].astype(np.uint8) * 3
    labels[data["fine"]["p1"]] = 1
    save(d["coarse"] / "p1_coarse.nii.gz", labels)
    with pytest.raises(ValueError, match=r"p1_coarse\.nii\.gz is ambiguous: values \[0, 1, 3\]"):
        ds_of(data)[0]
    np.testing.assert_array_equal(ds_of(data, foreground=[1, 3])[0]["coarse"].numpy(), labels > 0)


def test_shape_mismatch_names_the_files(data: dict) -> None:
    d = data["dirs"]
    save(d["coarse"] / "p2_coarse.nii.gz", np.zeros((D, H, W + 1), np.uint8))
    save(d["fine"] / "p3.nii.gz", np.zeros((D - 1, H, W), np.uint8))
    ds = ds_of(data, size=4)  # resizing must not hide it
    with pytest.raises(ValueError, match=rf"coarse mask .*p2_coarse\.nii\.gz has shape \({D}, {H}, {W + 1}\) "
                                         rf"but volume .*p2\.nii\.gz"):
        ds[1]
    with pytest.raises(ValueError, match=r"fine mask .*fine/p3\.nii\.gz has shape"):
        ds[2]
    ds[0]


def test_affine_mismatch(data: dict) -> None:
    save(data["dirs"]["coarse"] / "p1_coarse.nii.gz", data["coarse"]["p1"].astype(np.uint8),
         affine=np.diag([1.0, 1.0, 1.0, 1.0]))
    with pytest.raises(ValueError, match=r"p1_coarse\.nii\.gz and volume .*p1\.nii\.gz have different affines"):
        ds_of(data)[0]


def test_fine_outside_coarse_counts_voxels(data: dict) -> None:
    fine = data["fine"]["p3"].copy()
    fine[0, 0, 0] = fine[5, 7, 9] = True
    save(data["dirs"]["fine"] / "p3.nii.gz", fine.astype(np.uint8))
    with pytest.raises(ValueError, match=rf"fine mask .*p3\.nii\.gz is not inside its coarse mask "
                                         rf".*p3_coarse\.nii\.gz: 2 of its {int(fine.sum())} foreground voxels"):
        ds_of(data)[2]


def test_truncated_and_non_finite_volumes(data: dict) -> None:
    d = data["dirs"]
    path = d["images"] / "p1.nii.gz"
    blob = path.read_bytes()
    path.write_bytes(blob[: len(blob) // 2])
    bad = data["image"]["p2"].copy()
    bad[0, 0, 0, 1] = np.nan
    save(d["images"] / "p2.nii.gz", bad)
    (d["fine"] / "p3.nii.gz").write_bytes(b"not a nifti file at all")
    ds = ds_of(data)
    with pytest.raises(ValueError, match=r"cannot read volume file .*p1\.nii\.gz"):
        ds[0]
    with pytest.raises(ValueError, match=r"volume .*p2\.nii\.gz contains 1 non-finite"):
        ds[1]
    with pytest.raises(ValueError, match=r"cannot read fine mask file .*p3\.nii\.gz"):
        ds[2]


def test_missing_and_orphan_files(data: dict) -> None:
    d = data["dirs"]
    (d["coarse"] / "p2_coarse.nii.gz").unlink()
    with pytest.raises(ValueError, match=r"1 volume\(s\) in .*images have no coarse mask .*'p2'"):
        ds_of(data)
    save(d["coarse"] / "p2.nii.gz", data["coarse"]["p2"].astype(np.uint8))
    save(d["fine"] / "p9.nii.gz", np.zeros((D, H, W), np.uint8))
    with pytest.raises(ValueError, match=r"1 fine mask file\(s\) in .*fine have no volume .*'p9\.nii\.gz'"):
        ds_of(data)
    (d["fine"] / "p9.nii.gz").unlink()
    save(d["images"] / "p1.nii", data["image"]["p1"])
    with pytest.raises(ValueError, match=r"same name stem 'p1'.*p1\.nii and p1\.nii\.gz"):
        ds_of(data)


def test_bad_arguments(data: dict) -> None:
    with pytest.raises(TypeError, match=r"\(D, H, W\) triple"):
        ds_of(data, size=(4, 4))
    with pytest.raises(ValueError, match="size must be positive"):
        ds_of(data, size=(4, 0, 4))
    with pytest.raises(ValueError, match="foreground must not be an empty list"):
        ds_of(data, foreground=[])
    d = data["dirs"]
    with pytest.raises(ValueError, match="must be different folders"):
        NiftiFolder(d["images"], d["images"])
