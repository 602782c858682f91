"""Writes a small fake ISIC 2018 folder (real JPEG/PNG/CSV files, the challenge's file names)."""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_DIR = "ISIC2018_Task1-2_Training_Input"
MASK_DIR = "ISIC2018_Task1_Training_GroundTruth"
LABELS_CSV = "ISIC2018_Task3_Training_GroundTruth/ISIC2018_Task3_Training_GroundTruth.csv"
ARTEFACTS_CSV = "isic2018_artefacts.csv"
CLASSES = ("MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC")
ARTEFACT_COLUMNS = ("dark_corner", "hair", "gel_border", "gel_bubble", "ruler", "ink", "patches")
EXTRA_LABEL_ID = "ISIC_0024306"  # in the Task 3 CSV, not in Task 1


def isic_id(i: int) -> str:
    return f"ISIC_{i:07d}"


def unlabelled_id(n: int) -> str:
    """The Task 1 id that :func:`make_isic_folder` leaves out of the Task 3 CSV (the last one)."""
    return isic_id(n - 1)


def _lesion(rng: np.random.Generator, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """A skin-coloured RGB uint8 image with a dark random ellipse, and its 0/255 mask."""
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float64)
    cy, cx = rng.uniform(0.35, 0.65) * h, rng.uniform(0.35, 0.65) * w
    ay, ax = rng.uniform(0.15, 0.3) * h, rng.uniform(0.15, 0.3) * w
    t = rng.uniform(0, np.pi)
    dy, dx = yy - cy, xx - cx
    u = dx * np.cos(t) + dy * np.sin(t)
    v = -dx * np.sin(t) + dy * np.cos(t)
    inside = (u / ax) ** 2 + (v / ay) ** 2 <= 1.0
    skin = np.array([205.0, 160.0, 140.0]) + rng.normal(0, 8, size=(h, w, 3))
    lesion = np.array([95.0, 60.0, 45.0]) + rng.normal(0, 8, size=(h, w, 3))
    rgb = np.where(inside[..., None], lesion, skin).clip(0, 255).astype(np.uint8)
    return rgb, inside.astype(np.uint8) * 255


def make_isic_folder(root: str | Path, n: int = 6, size: tuple[int, int] = (40, 30), seed: int = 0,
                     with_artefacts: bool = True) -> Path:
    """Create a fake ISIC 2018 tree under ``root`` and return ``root``.

    ``n`` Task 1 images ``ISIC_0000000.jpg ...`` of ``size`` (H, W) with ``_segmentation.png``
    masks, ``ATTRIBUTION.txt``/``LICENSE.txt`` beside them, a Task 3 one-hot CSV covering all but
    the last image (:func:`unlabelled_id`) plus :data:`EXTRA_LABEL_ID`, the first labelled image
    MEL and the second NV, and (``with_artefacts``) an artefact CSV :data:`ARTEFACTS_CSV` with
    random 0/1 flags for all ``n`` images.
    """
    if n < 3:
        raise ValueError(f"n must be >= 3, got {n}")
    root = Path(root)
    h, w = size
    rng = np.random.default_rng(seed)
    img_dir, mask_dir = root / IMAGE_DIR, root / MASK_DIR
    img_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)
    (root / LABELS_CSV).parent.mkdir(parents=True, exist_ok=True)
    for d in (img_dir, mask_dir):
        (d / "ATTRIBUTION.txt").write_text("ISIC_0000000: Anonymous\n")
        (d / "LICENSE.txt").write_text("CC-BY-NC\n")

    ids = [isic_id(i) for i in range(n)]
    for i in ids:
        rgb, mask = _lesion(rng, h, w)
        Image.fromarray(rgb).save(img_dir / f"{i}.jpg", quality=92)
        Image.fromarray(mask).save(mask_dir / f"{i}_segmentation.png")

    labelled = ids[:-1] + [EXTRA_LABEL_ID]
    with open(root / LABELS_CSV, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", *CLASSES])
        for k, i in enumerate(labelled):
            cls = 0 if k == 0 else 1 if k == 1 else int(rng.integers(len(CLASSES)))
            writer.writerow([i, *("1.0" if c == cls else "0.0" for c in range(len(CLASSES)))])

    if with_artefacts:
        flags = rng.integers(0, 2, size=(n, len(ARTEFACT_COLUMNS)))
        with open(root / ARTEFACTS_CSV, "w", newline="") as fh:
            writer = csv.writer(fh)
            writer.writerow(["image", *ARTEFACT_COLUMNS])
            for i, row in zip(ids, flags):
                writer.writerow([i, *map(int, row)])
    return root
