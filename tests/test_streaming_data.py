"""StreamingSegmentationData: the operators read a Dataset a batch at a time and get what the in-memory data gives."""
from __future__ import annotations

import glob
import tempfile

import pytest
import torch
import torch.nn as nn

from pyunlearn import unlearn
from pyunlearn.masks import coarsen
from pyunlearn.models import EncoderDecoder
from pyunlearn.unlearn import SegmentationUnlearningData, StreamingSegmentationData

N, SIZE = 10, 16


def _tensors(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    images = torch.rand(N, 3, SIZE, SIZE, generator=g)
    fine = torch.zeros(N, SIZE, SIZE, dtype=torch.bool)
    for i in range(N):
        r, c = 3 + i % 5, 4 + (i * 3) % 6
        fine[i, r:r + 5, c:c + 6] = True
    coarse = coarsen(fine, radius=2)
    has_fine = torch.zeros(N, dtype=torch.bool)
    has_fine[::3] = True
    return images, coarse, fine, has_fine


class ItemDataset(torch.utils.data.Dataset):
    """Items as the loaders of pyunlearn.data give them."""

    def __init__(self, images, coarse, fine, has_fine):
        self.images, self.coarse, self.fine, self.has_fine = images, coarse, fine, has_fine
        self.reads = 0

    def __len__(self):
        return self.images.shape[0]

    def __getitem__(self, i):
        self.reads += 1
        return {"image": self.images[i], "coarse": self.coarse[i], "fine": self.fine[i] & self.has_fine[i],
                "has_fine": self.has_fine[i], "label": torch.tensor(i % 2), "id": f"img{i:03d}"}


def _both(**kwargs):
    tensors = _tensors()
    return SegmentationUnlearningData.from_masks(*tensors), StreamingSegmentationData(ItemDataset(*tensors), **kwargs)


def _small_net():
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.GELU(), nn.Conv2d(4, 2, 1))


def _frozen_encoder_decoder():
    torch.manual_seed(0)
    return EncoderDecoder(in_channels=3, width=4).freeze_encoder()


def _params(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_pixel_sets_and_flags_match_the_in_memory_data():
    memory, stream = _both(scan_batch_size=3)
    assert len(stream) == N and stream.spatial == (SIZE, SIZE) and stream.image_shape == (3, SIZE, SIZE)
    assert torch.equal(stream.has_fine, memory.has_fine)
    for pixels in ("retain", "forget", "all"):
        assert torch.equal(stream.image_indices(pixels), memory.image_indices(pixels)), pixels
    index = torch.tensor([7, 0, 3])
    got, want = stream.batch(index), memory.batch(index)
    for name in ("images", "target", "retain", "forget", "coarse", "has_fine"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    assert torch.equal(got.relabelled_target, want.relabelled_target)


@pytest.mark.parametrize("operator, kwargs", [
    (unlearn.gradient_clipping, dict(epsilon=1.0, delta=1e-5, steps=3, c1=0.5, lr=0.05, finetune_steps=2)),
    (unlearn.model_clipping, dict(epsilon=1.0, delta=1e-5, steps=2, c2=2.0, finetune_steps=2)),
    (unlearn.output_perturbation, dict(epsilon=1.0, delta=1e-5, finetune_steps=2)),
    (unlearn.finetune, dict(steps=3)),
    (unlearn.relabel, dict(steps=3)),
    (unlearn.neggrad_seg, dict(steps=3, loss="dice_ce")),
    (unlearn.train_segmenter, dict(steps=3, target="all", inplace=False)),
])
def test_streaming_gives_the_in_memory_result(operator, kwargs):
    memory, stream = _both()
    if operator in (unlearn.gradient_clipping, unlearn.model_clipping, unlearn.output_perturbation):
        kwargs = dict(kwargs, noise_seed=11)
    a, rec_a = operator(_small_net(), memory, batch_size=4, seed=3, **kwargs)
    b, rec_b = operator(_small_net(), stream, batch_size=4, seed=3, **kwargs)
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(x, y), name
    assert rec_a["losses"] == rec_b["losses"]
    assert rec_a["certificate"] == rec_b["certificate"]


@pytest.mark.parametrize("cache", ["memory", "disk", "none", "auto"])
def test_feature_caches_give_the_same_model(cache, monkeypatch):
    memory, _ = _both()
    want, _ = unlearn.gradient_clipping(_frozen_encoder_decoder(), memory, epsilon=1.0, delta=1e-5, steps=3,
                                        finetune_steps=2, batch_size=4, noise_seed=5)
    created = []
    real = tempfile.mkdtemp
    monkeypatch.setattr(tempfile, "mkdtemp", lambda **kw: created.append(real(**kw)) or created[-1])
    _, stream = _both(feature_cache=cache)
    got, _ = unlearn.gradient_clipping(_frozen_encoder_decoder(), stream, epsilon=1.0, delta=1e-5, steps=3,
                                       finetune_steps=2, batch_size=4, noise_seed=5)
    for (name, x), y in zip(want.named_parameters(), got.parameters()):
        # The encoder runs on other batches without a cache (1 ulp of float32 convolution at most).
        torch.testing.assert_close(y, x, rtol=0, atol=0 if cache != "none" else 1e-5, msg=name)
    assert len(created) == (cache == "disk")
    for folder in created:
        assert not glob.glob(folder), "the on-disk feature cache of private data must be deleted"


def test_auto_cache_skips_features_over_budget():
    _, stream = _both(feature_cache_bytes=1)
    inputs = unlearn.segmentation._Inputs(_frozen_encoder_decoder(), stream)
    assert inputs.frozen_encoder and inputs.features is None
    _, stream = _both()
    inputs = unlearn.segmentation._Inputs(_frozen_encoder_decoder(), stream)
    assert inputs.features is not None and inputs.features[0].shape[0] == N


def test_reads_through_loader_workers():
    memory, _ = _both()
    _, stream = _both(num_workers=2)
    a, _ = unlearn.finetune(_small_net(), memory, steps=2, batch_size=4)
    b, _ = unlearn.finetune(_small_net(), stream, steps=2, batch_size=4)
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters()))


def test_memory_holds_no_images():
    tensors = _tensors()
    dataset = ItemDataset(*tensors)
    stream = StreamingSegmentationData(dataset)
    assert dataset.reads == N  # one scan
    held = [v for v in vars(stream).values() if isinstance(v, torch.Tensor)]
    assert all(t.numel() <= N for t in held), "only per-image flags are kept"


class Augmented(ItemDataset):
    def __getitem__(self, i):
        item = super().__getitem__(i)
        item["image"] = item["image"] + 1e-3 * torch.rand(())
        return item


def test_a_dataset_that_changes_is_refused():
    stream = StreamingSegmentationData(Augmented(*_tensors()))
    before = _params(net := _small_net())
    with pytest.raises(ValueError, match="differs from when it was first read"):
        unlearn.gradient_clipping(net, stream, epsilon=1.0, delta=1e-5, steps=2, finetune_steps=0, batch_size=4,
                                  inplace=True)
    assert all(torch.equal(p, before[n]) for n, p in net.named_parameters()), "a failed run leaves the model"


def _edited(**change):
    images, coarse, fine, has_fine = _tensors()
    if "nan" in change:
        images[4, 0, 1, 1] = float("nan")
    if "outside" in change:
        fine[3, 0, 0] = True
        has_fine[3] = True
    return ItemDataset(images, coarse, fine, has_fine)


@pytest.mark.parametrize("change, match", [
    ("nan", r"item 4 \(id 'img004'\): 'image' holds NaN"),
    ("outside", r"item 3: fine mask is not inside the coarse mask"),
])
def test_bad_items_are_named(change, match):
    with pytest.raises(ValueError, match=match):
        StreamingSegmentationData(_edited(**{change: True}), scan_batch_size=4)


def test_bad_arguments():
    tensors = _tensors()
    with pytest.raises(ValueError, match="feature_cache"):
        StreamingSegmentationData(ItemDataset(*tensors), feature_cache="gpu")
    with pytest.raises(ValueError, match="num_workers"):
        StreamingSegmentationData(ItemDataset(*tensors), num_workers=-1)
    with pytest.raises(TypeError, match="map-style"):
        StreamingSegmentationData(iter([]))

    class NoMask(ItemDataset):
        def __getitem__(self, i):
            item = super().__getitem__(i)
            del item["coarse"]
            return item

    with pytest.raises(ValueError, match=r"item 0 \(id 'img000'\): missing key\(s\) \['coarse'\]"):
        StreamingSegmentationData(NoMask(*tensors))


def test_resume_binds_the_streamed_data(tmp_path, monkeypatch):
    monkeypatch.setenv("PYUNLEARN_CHECKPOINT_KEY", "k" * 32)
    _, stream = _both()
    path = tmp_path / "ck" / "run.pt"
    path.parent.mkdir()
    unlearn.finetune(_small_net(), stream, steps=4, batch_size=4, checkpoint=path, checkpoint_every=2,
                     keep_checkpoints=True)
    images, coarse, fine, has_fine = _tensors()
    images[0, 0, 0, 0] += 0.5
    other = StreamingSegmentationData(ItemDataset(images, coarse, fine, has_fine))
    with pytest.raises(unlearn.segmentation.CheckpointError, match="different run; differing entries.*data"):
        unlearn.finetune(_small_net(), other, steps=4, batch_size=4, checkpoint=path, checkpoint_every=2)


def test_nifti_volumes_stream_into_a_3d_monai_unet(tmp_path):
    nib = pytest.importorskip("nibabel")
    monai_nets = pytest.importorskip("monai.networks.nets")
    import numpy as np

    from pyunlearn.data import NiftiFolder

    shape = (8, 8, 8)
    for sub in ("images", "coarse", "fine"):
        (tmp_path / sub).mkdir()
    g = np.random.default_rng(0)
    for i in range(4):
        fine = np.zeros(shape, dtype=np.uint8)
        fine[2:5, 2 + i % 2:5, 3:6] = 1
        coarse = np.zeros(shape, dtype=np.uint8)
        coarse[1:6, 1:7, 2:7] = 1
        nib.Nifti1Image(g.random(shape).astype(np.float32) + fine, np.eye(4)).to_filename(
            str(tmp_path / "images" / f"v{i}.nii.gz"))
        nib.Nifti1Image(coarse, np.eye(4)).to_filename(str(tmp_path / "coarse" / f"v{i}.nii.gz"))
        if i % 2 == 0:
            nib.Nifti1Image(fine, np.eye(4)).to_filename(str(tmp_path / "fine" / f"v{i}.nii.gz"))
    data = StreamingSegmentationData(NiftiFolder(tmp_path / "images", tmp_path / "coarse", tmp_path / "fine"))
    assert data.image_shape == (1, *shape) and data.has_fine.tolist() == [True, False, True, False]
    torch.manual_seed(0)
    net = monai_nets.UNet(spatial_dims=3, in_channels=1, out_channels=2, channels=(4, 8), strides=(2,),
                          num_res_units=0)
    out, record = unlearn.gradient_clipping(net, data, epsilon=1.0, delta=1e-5, steps=2, finetune_steps=1,
                                            batch_size=2, loss="dice_ce", noise_seed=1)
    assert 0.99 < record["certificate"]["epsilon"] <= 1.0 and len(record["losses"]) == 1
    assert not all(torch.equal(a, b) for a, b in zip(out.parameters(), net.parameters()))


def test_streamed_evaluation_matches_the_in_memory_one():
    from pyunlearn import pipeline

    images, coarse, fine, has_fine = _tensors()
    labels = torch.tensor([i % 2 for i in range(N)])
    has_artefact = torch.tensor([(i // 2) % 2 == 1 for i in range(N)])
    memory = pipeline.EvalSet(images=images, fine=fine, labels=labels, has_artefact=has_artefact)
    stream = pipeline.StreamingEvalSet(ItemDataset(images, coarse, fine, torch.ones_like(has_fine)), labels=labels,
                                       has_artefact=has_artefact, batch_size=3)
    model = _small_net()
    want, got = pipeline.evaluate(model, memory, fast=True), pipeline.evaluate(model, stream)
    for key in ("auroc", "worst_group_auroc", "dice"):
        assert got[key] == pytest.approx(want[key], rel=1e-12, abs=1e-12), key
    assert pipeline._check_dead(model, None, stream) is None
    dead = nn.Conv2d(3, 2, 1)
    nn.init.zeros_(dead.weight)
    assert pipeline._check_dead(dead, None, stream) == pipeline._check_dead(dead, None, memory)
    assert "constant output" in pipeline._check_dead(dead, None, stream)
    sub = stream.subset([4, 1])
    assert torch.equal(sub.images, images[[4, 1]]) and torch.equal(sub.fine, fine[[4, 1]])
