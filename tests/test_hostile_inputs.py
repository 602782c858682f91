"""The hostile and broken inputs table: every bad input a user can produce, one row each.

Each row builds a small real setup (a tiny ``EncoderDecoder(width=4)`` with a frozen encoder and its
optimizer, a loss call, a masks call, an operator run, or a loader on a generated fixture folder),
then performs ONE bad action. The test asserts the exception type and that its message says what is
wrong and where, then that nothing changed: the model's parameters and buffers equal a snapshot
taken just before the bad action, the optimizer's ``state_dict()`` and step counter are unchanged,
and a certified optimizer issues no certificate for the (incomplete) run.

Decisions documented here (see also the tests after the table):

* Empty forget set (segmentation, ``coarse == fine``): accepted. The retain set is well defined, an
  operator fine-tunes on it, and the certificate is valid (it bounds the distance to retraining on
  the retain set, which holds whatever the forget set is). Pixel-level PSG, which relabels forget
  pixels, refuses it; classification ``psg`` with an empty forget set refuses it too.
* "All pixels forgotten": on fine-labelled images every pixel is retain data (with its fine label,
  so forget pixels are relabelled to background), hence the retain set can only be empty when no
  image has a fine mask and the coarse masks cover every pixel: every pixel is coarse-labelled and
  none is known to be right. An operator then raises ``ValueError`` (empty retain set). Every image
  fine-labelled with every pixel in the forget set is accepted (all pixels retained as background).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import pytest
import torch
import torch.nn as nn
from fixtures_isic import IMAGE_DIR, LABELS_CSV, MASK_DIR, isic_id, make_isic_folder
from PIL import Image

from pyunlearn import masks, unlearn
from pyunlearn.certify import CertificateError
from pyunlearn.data.folders import ImageMaskFolder
from pyunlearn.data.isic import ISIC2018
from pyunlearn.losses import masked_cross_entropy
from pyunlearn.models import EncoderDecoder
from pyunlearn.optim import GradientClipping, ModelClipping
from pyunlearn.optim._certified import CertifiedOptimizer
from pyunlearn.unlearn import SegmentationUnlearningData

try:
    from pyunlearn.optim.dpsgd import DPSGD
except ImportError:  # pragma: no cover - DP-SGD is optional in this table
    DPSGD = None

N, H, W = 3, 6, 6  # 3 images of 6 x 6 (even: the encoder pools by 2)
NAN, INF = float("nan"), float("inf")


@dataclass
class Case:
    """A setup and the one bad ``action`` on it; ``model``/``optimizer`` are what must not change."""

    action: Callable[[], Any]
    model: Optional[nn.Module] = None
    optimizer: Optional[torch.optim.Optimizer] = None


# ------------------------------------------------------------------------------------------ builders
def tiny_model(seed: int = 0) -> EncoderDecoder:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return EncoderDecoder(width=4).freeze_encoder()


def trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param(model: nn.Module, name: str) -> nn.Parameter:
    return dict(model.named_parameters())[name]


def seg_tensors(has_fine=(True, False, True)):
    """images (N, 3, H, W) in [0, 1], fine (a block per image), coarse = fine dilated by 1, has_fine."""
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(N, 3, H, W, generator=gen)
    fine = torch.zeros(N, H, W, dtype=torch.bool)
    fine[:, 2:4, 1:4] = True
    coarse = masks.coarsen(fine, radius=1)
    return images, coarse, fine, torch.tensor(has_fine)


def seg_data(**kw) -> SegmentationUnlearningData:
    return SegmentationUnlearningData.from_masks(*seg_tensors(**kw))


def train_step(model: nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    images, _, fine, _ = seg_tensors()
    opt.zero_grad(set_to_none=True)
    masked_cross_entropy(model(images + 0.01 * step), fine.long(), torch.ones_like(fine)).backward()
    opt.step()


def gc(model: nn.Module, named: Optional[list] = None, **override) -> GradientClipping:
    kw = dict(lr=0.1, c0=1.0, c1=1.0, delta=1e-5, steps=2, sigma=0.05, seed=3)
    return GradientClipping(trainable(model) if named is None else named, **{**kw, **override})


def mc(model: nn.Module, named: Optional[list] = None, **override) -> ModelClipping:
    kw = dict(lr=0.1, c2=1.0, delta=1e-5, steps=2, sigma=0.05, seed=3)
    return ModelClipping(trainable(model) if named is None else named, **{**kw, **override})


OPTIMIZERS = {"gradient_clipping": gc, "model_clipping": mc}


def after_one_step(make_opt: Callable, **override) -> tuple[nn.Module, torch.optim.Optimizer]:
    """A model and a certified optimizer (2 planned steps) with one good step taken, grads set."""
    model = tiny_model()
    opt = make_opt(model, **override)
    train_step(model, opt, 0)
    images, _, fine, _ = seg_tensors()
    opt.zero_grad(set_to_none=True)
    masked_cross_entropy(model(images), fine.long(), torch.ones_like(fine)).backward()
    return model, opt


def step_case(make_opt: Callable, corrupt: Callable[[nn.Module], None], **override) -> Callable:
    """After one good step, ``corrupt(model)`` (the gradients or the parameters); the action: step."""
    def build(tmp_path: Path) -> Case:
        model, opt = after_one_step(make_opt, **override)
        corrupt(model)
        return Case(opt.step, model, opt)
    return build


def set_grad(name: str, value: float, index=(0,)) -> Callable[[nn.Module], None]:
    def corrupt(model):
        param(model, name).grad.view(-1)[index] = value
    return corrupt


def sparse_grad(model):
    p = param(model, "decoder.fuse.bias")
    p.grad = p.grad.detach().to_sparse()


def reshaped_grad(model):
    p = param(model, "decoder.norm.weight")
    p.grad.data = torch.zeros(p.numel() + 1)  # ``.data`` bypasses autograd's own shape check


def integer_grad(model):
    p = param(model, "decoder.head.bias")
    p.grad_dtype = None  # lifts autograd's own dtype check
    p.grad = torch.ones(p.shape, dtype=torch.int64)


def tamper(model):
    param(model, "decoder.refine.weight").data.add_(1)


def construct(make_opt: Callable, named: Optional[Callable[[nn.Module], list]] = None, **override) -> Callable:
    """The action: building the optimizer with bad hyper-parameters or parameters (``named(model)``).
    The model's norm is above every clip norm used, so a constructor that clipped (or added noise)
    before validating would show."""
    def build(tmp_path: Path) -> Case:
        model = tiny_model()
        with torch.no_grad():
            for _, p in trainable(model):
                p.mul_(10.0)
        params = None if named is None else named(model)
        return Case(lambda: make_opt(model, params, **override), model)
    return build


def meta_bias(model):
    model.decoder.head.bias = nn.Parameter(torch.zeros(1, device="meta"))  # one parameter elsewhere
    return trainable(model)


def sparse_bias(model):
    model.decoder.head.bias = nn.Parameter(torch.zeros(1).to_sparse())
    return trainable(model)


def bf16_model(model):
    model.to(torch.bfloat16)
    return trainable(model)


def with_int_tensor(model):
    return trainable(model) + [("decoder.counter", torch.zeros(2, dtype=torch.int64))]


def operator(method: str, data_fn: Callable[[], SegmentationUnlearningData] = seg_data,
             prepare: Callable[[nn.Module], None] = lambda m: None, **kw) -> Callable:
    """The action: running ``unlearn.<method>`` (small, fast settings) on a tiny model."""
    fast = {"finetune": dict(steps=2, batch_size=2),
            "gradient_clipping": dict(steps=2, finetune_steps=0, batch_size=2, sigma=0.01, noise_seed=1),
            "model_clipping": dict(steps=2, finetune_steps=0, batch_size=2, sigma=0.01, noise_seed=1),
            "psg_segmentation": dict(steps=1, inner_steps=1)}[method]

    def build(tmp_path: Path) -> Case:
        model = tiny_model()
        prepare(model)
        data = data_fn()
        return Case(lambda: getattr(unlearn, method)(model, data, **{**fast, **kw}), model)
    return build


def one_channel_data() -> SegmentationUnlearningData:
    images, *rest = seg_tensors()
    return SegmentationUnlearningData.from_masks(images[:, :1].contiguous(), *rest)


def nan_image_data() -> SegmentationUnlearningData:
    data = seg_data()
    data.images[1, 0, 2, 3] = NAN  # from_masks accepts it: the operator's loss check catches it
    return data


def inf_bias(model):
    with torch.no_grad():
        model.decoder.head.bias.fill_(INF)


def no_retain_data() -> SegmentationUnlearningData:
    images, _, fine, _ = seg_tensors()
    coarse = torch.ones_like(fine)  # every pixel coarse-labelled ...
    none_fine = torch.zeros(N, dtype=torch.bool)  # ... and no image has a fine mask
    return SegmentationUnlearningData.from_masks(images, coarse, fine, none_fine)


def empty_forget_data() -> SegmentationUnlearningData:
    images, _, fine, has_fine = seg_tensors()
    return SegmentationUnlearningData.from_masks(images, fine, fine, has_fine)


def call(fn: Callable, *args, **kwargs) -> Callable:
    """A row whose action is ``fn(*args, **kwargs)`` with arguments built fresh for each run."""
    def build(tmp_path: Path) -> Case:
        return Case(lambda: fn(*[a() if callable(a) else a for a in args],
                               **{k: v() if callable(v) else v for k, v in kwargs.items()}))
    return build


def from_masks(**changes) -> Callable:
    """``SegmentationUnlearningData.from_masks`` with some of its inputs replaced (callables of the
    valid tensors ``images, coarse, fine, has_fine``)."""
    def build(tmp_path: Path) -> Case:
        inputs = dict(zip(("images", "coarse", "fine", "has_fine"), seg_tensors()))
        for key, change in changes.items():
            inputs[key] = change(inputs[key])
        return Case(lambda: SegmentationUnlearningData.from_masks(**inputs))
    return build


def with_value(index, value, dtype: torch.dtype) -> Callable[[torch.Tensor], torch.Tensor]:
    """A copy of a tensor as ``dtype`` with ``value`` written at ``index``."""
    def change(t):
        t = t.to(dtype).clone()
        t[index] = value
        return t
    return change


def fine_outside_coarse_on_image_2(inputs_fine: torch.Tensor) -> torch.Tensor:
    fine = inputs_fine.clone()
    fine[2, 0, 0] = True  # far from the block: outside the dilated coarse mask
    return fine


def loss_call(**changes) -> Callable:
    """``masked_cross_entropy`` on valid ``(B=2, K=3, 5, 3)`` inputs with some replaced (callables)."""
    def build(tmp_path: Path) -> Case:
        gen = torch.Generator().manual_seed(1)
        kw = dict(logits=torch.randn(2, 3, 5, 3, generator=gen), target=torch.randint(0, 3, (2, 5, 3), generator=gen),
                  mask=torch.rand(2, 5, 3, generator=gen) < 0.5)
        for key, change in changes.items():
            kw[key] = change(kw.get(key))
        return Case(lambda: masked_cross_entropy(**kw))
    return build


# --------------------------------------------------------------------------------------- loaders
def isic_root(tmp_path: Path, corrupt: Callable[[Path], None]) -> Path:
    root = make_isic_folder(tmp_path / "isic", n=4, size=(10, 8), seed=0, with_artefacts=False)
    corrupt(root)
    return root


def truncated_isic_image(tmp_path: Path) -> Case:
    def corrupt(root):
        path = root / IMAGE_DIR / f"{isic_id(1)}.jpg"
        path.write_bytes(path.read_bytes()[:200])
    root = isic_root(tmp_path, corrupt)
    with pytest.warns(UserWarning, match="dropped 1 of 4"):  # the last fixture image has no label row
        ds = ISIC2018(root, size=None)  # construction only lists files: the item read fails
    return Case(lambda: ds[1])


def isic_missing_mask(tmp_path: Path) -> Case:
    root = isic_root(tmp_path, lambda r: (r / MASK_DIR / f"{isic_id(2)}_segmentation.png").unlink())
    return Case(lambda: ISIC2018(root))


def isic_csv_missing_column(tmp_path: Path) -> Case:
    def corrupt(root):  # drop the MEL column (the default positive class)
        path = root / LABELS_CSV
        rows = [line.split(",") for line in path.read_text().splitlines()]
        path.write_text("".join(",".join(r[:1] + r[2:]) + "\n" for r in rows))
    root = isic_root(tmp_path, corrupt)
    return Case(lambda: ISIC2018(root))


def folder(tmp_path: Path, *, mask_missing: bool = False, csv_text: Optional[str] = None) -> Case:
    images, mask_dir = tmp_path / "images", tmp_path / "masks"
    images.mkdir()
    mask_dir.mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (5, 7), (120, 80, 60)).save(images / f"{stem}.png")
        if not (mask_missing and stem == "b"):
            Image.new("L", (5, 7), 255).save(mask_dir / f"{stem}_mask.png")
    labels = None
    if csv_text is not None:
        labels = tmp_path / "labels.csv"
        labels.write_text(csv_text)
    return Case(lambda: ImageMaskFolder(images, mask_dir, labels_csv=labels))


# ------------------------------------------------------------------------------ other single cases
def step_after_last_planned_step(tmp_path: Path) -> Case:
    # The run is complete and a certificate exists (sigma = 1: a moderate epsilon, so the sampler's share
    # of delta stays far below its 10% cap).
    model, opt = after_one_step(gc, steps=1, sigma=1.0)
    return Case(opt.step, model, opt)


def _classification_case(forget_size: int, **kw) -> Callable:
    def build(tmp_path: Path) -> Case:
        from pyunlearn.models_classify import LinearClassifier

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            model = LinearClassifier(4, 3)
        gen = torch.Generator().manual_seed(0)
        remain = (torch.rand(5, 4, generator=gen), torch.randint(0, 3, (5,), generator=gen))
        forget = (torch.rand(forget_size, 4, generator=gen), torch.randint(0, 3, (forget_size,), generator=gen))
        return Case(lambda: unlearn.psg(model, forget, remain, steps=1, inner_steps=1, **kw), model)
    return build


classification_psg_empty_forget = _classification_case(0)


def dpsgd_case(corrupt: Optional[Callable[[nn.Module], None]] = None, **override) -> Callable:
    """DP-SGD with a plain ``backward()`` gradient (``check_clipped`` decides whether that is refused)."""
    def build(tmp_path: Path) -> Case:
        model = tiny_model()
        kw = dict(lr=0.1, max_grad_norm=1.0, expected_batch_size=3.0, noise_multiplier=0.5, seed=0,
                  check_clipped=False)
        kw.update(override)
        if corrupt is None:  # the action is the construction
            return Case(lambda: DPSGD(trainable(model), **kw), model)
        opt = DPSGD(trainable(model), **kw)
        images, _, fine, _ = seg_tensors()
        masked_cross_entropy(model(images), fine.long(), torch.ones_like(fine)).backward()
        corrupt(model)
        return Case(opt.step, model, opt)
    return build


# -------------------------------------------------------------------------------------------- table
def opt_rows(what: str, corrupt: Callable[[nn.Module], None], exc: type, match: str) -> list:
    return [pytest.param(step_case(make, corrupt), exc, match, id=f"{name}/{what}")
            for name, make in OPTIMIZERS.items()]


def row(build: Callable, exc: type, match: str, id: str, needs: Optional[object] = True):
    marks = () if needs is not None else pytest.mark.skip(reason="pyunlearn.optim.dpsgd is not importable")
    return pytest.param(build, exc, match, id=id, marks=marks)


BOOL = torch.bool
TABLE = [
    # ---- NaN/Inf gradients, sparse / malformed gradients, the model changed between steps
    *opt_rows("nan-gradient", set_grad("decoder.head.bias", NAN), ValueError,
              r"gradient of parameter 'decoder\.head\.bias' contains NaN or Inf; the step was not taken"),
    *opt_rows("inf-gradient", set_grad("decoder.refine.weight", -INF, (5,)), ValueError,
              r"gradient of parameter 'decoder\.refine\.weight' contains NaN or Inf"),
    *opt_rows("sparse-gradient", sparse_grad, TypeError, r"parameter 'decoder\.fuse\.bias' has a sparse gradient"),
    *opt_rows("gradient-wrong-shape", reshaped_grad, ValueError,
              r"gradient of parameter 'decoder\.norm\.weight' has shape \(5,\), expected \(4,\)"),
    *opt_rows("gradient-integer-dtype", integer_grad, TypeError,
              r"gradient of parameter 'decoder\.head\.bias' has dtype torch\.int64"),
    *opt_rows("model-changed-between-steps", tamper, CertificateError,
              r"step 1: the certified parameters were changed outside"),
    row(step_after_last_planned_step, RuntimeError, r"GradientClipping: all 1 planned steps are done",
        id="gradient_clipping/step-after-the-last-planned-step"),
    # ---- parameters: several devices, sparse, not floating point
    row(construct(gc, meta_bias), ValueError, r"certified parameters must be on one device, got \['cpu', 'meta'\]",
        id="gradient_clipping/parameters-on-several-devices"),
    row(construct(mc, meta_bias), ValueError, r"must be on one device.*meta",
        id="model_clipping/parameters-on-several-devices"),
    row(construct(gc, sparse_bias), TypeError, r"parameter 'decoder\.head\.bias' is sparse",
        id="gradient_clipping/sparse-parameter"),
    row(construct(mc, with_int_tensor), TypeError, r"parameter 'decoder\.counter' must be floating point",
        id="model_clipping/integer-parameter"),
    row(construct(gc, bf16_model), TypeError,
        r"parameter 'decoder\.fuse\.weight' is torch\.bfloat16; .*torch\.autocast",
        id="gradient_clipping/bf16-parameters"),
    # ---- invalid epsilon, delta, sigma, clip norms, learning rates, step counts
    row(construct(gc, sigma=None, epsilon=0.0), ValueError, r"epsilon must be finite and > 0, got 0\.0",
        id="gradient_clipping/epsilon-zero"),
    row(construct(mc, sigma=None, epsilon=NAN), ValueError, r"epsilon must be finite and > 0, got nan",
        id="model_clipping/epsilon-nan"),
    row(construct(gc, delta=1.0), ValueError, r"delta must be in \(0, 1\), got 1\.0", id="gradient_clipping/delta-one"),
    row(construct(mc, delta=0.0), ValueError, r"delta must be finite and > 0, got 0\.0",
        id="model_clipping/delta-zero"),
    row(construct(gc, sigma=-0.1), ValueError, r"sigma must be finite and >= 0, got -0\.1",
        id="gradient_clipping/sigma-negative"),
    row(construct(mc, sigma=INF), ValueError, r"sigma must be finite and >= 0, got inf", id="model_clipping/sigma-inf"),
    row(construct(mc, sigma0=-1.0), ValueError, r"sigma0 must be finite and >= 0", id="model_clipping/sigma0-negative"),
    row(construct(gc, sigma=0.1, epsilon=1.0), ValueError, r"exactly one of sigma=.*or epsilon=",
        id="gradient_clipping/sigma-and-epsilon"),
    row(construct(gc, c0=0.0), ValueError, r"c0 must be finite and > 0, got 0\.0", id="gradient_clipping/c0-zero"),
    row(construct(gc, c1=-1.0), ValueError, r"c1 must be finite and > 0, got -1\.0",
        id="gradient_clipping/c1-negative"),
    row(construct(mc, c2=NAN), ValueError, r"c2 must be finite and > 0, got nan", id="model_clipping/c2-nan"),
    row(construct(gc, lr=0.0), ValueError, r"lr must be finite and > 0, got 0\.0", id="gradient_clipping/lr-zero"),
    row(construct(mc, lr="fast"), TypeError, r"lr must be a number, got 'fast'", id="model_clipping/lr-not-a-number"),
    row(construct(gc, lr=0.5, weight_decay=4.0), ValueError, r"lr \* weight_decay must be < 1",
        id="gradient_clipping/lr-times-weight-decay"),
    row(construct(gc, steps=0), ValueError, r"steps must be an int >= 1, got 0", id="gradient_clipping/steps-zero"),
    row(construct(mc, steps=2.5), ValueError, r"steps must be an int >= 1, got 2\.5", id="model_clipping/steps-float"),
    row(construct(gc, steps=True), ValueError, r"steps must be an int >= 1, got True",
        id="gradient_clipping/steps-bool"),
    row(construct(gc, seed=-1), ValueError, r"seed must be an int in \[0, 2\*\*63\)",
        id="gradient_clipping/seed-negative"),
    # ---- operators: NaN inputs, non-finite loss, empty sets, bad hyper-parameters
    row(operator("gradient_clipping", nan_image_data, batch_size=N), ValueError,
        r"gradient_clipping: the loss at step 0 is nan \(NaN/Inf\); the step was not taken",
        id="operator/nan-in-images"),
    row(operator("finetune", prepare=inf_bias, inplace=True), ValueError,
        r"finetune: the loss at step 0 is (inf|nan) \(NaN/Inf\)", id="operator/inf-loss-inplace"),
    row(operator("model_clipping", no_retain_data), ValueError, r"model_clipping: .*empty retain set",
        id="operator/all-pixels-coarse-none-fine-empty-retain"),
    row(operator("psg_segmentation", empty_forget_data), ValueError, r"data\.forget is empty",
        id="operator/psg-segmentation-empty-forget"),
    row(classification_psg_empty_forget, ValueError, r"forget is empty \(0 samples\)",
        id="operator/classification-psg-empty-forget"),
    row(_classification_case(2, lr=-0.5), ValueError, r"^lr must be finite and > 0, got -0\.5",
        id="operator/classification-lr-negative"),
    row(operator("finetune", steps=-1, inplace=True), ValueError, r"finetune: steps must be an int >= 0, got -1",
        id="operator/steps-negative"),
    row(operator("finetune", steps=2.0, inplace=True), ValueError, r"finetune: steps must be an int >= 0, got 2\.0",
        id="operator/steps-float"),
    row(operator("finetune", batch_size=0, inplace=True), ValueError,
        r"finetune: batch_size must be an int >= 1, got 0", id="operator/batch-size-zero"),
    row(operator("finetune", one_channel_data, inplace=True), ValueError,
        r"^the model does not take data\.images with 1 channels \(a batch has shape \(\d+, 1, ",
        id="operator/image-channels-frozen-encoder"),
    row(operator("finetune", one_channel_data, prepare=lambda m: m.encoder.requires_grad_(True), inplace=True),
        ValueError, r"^the model does not take data\.images with 1 channels", id="operator/image-channels"),
    row(operator("finetune", lr=-1e-3, inplace=True), ValueError, r"^lr must be finite and > 0, got -0\.001",
        id="operator/lr-negative"),
    row(operator("gradient_clipping", finetune_lr=float("nan")), ValueError,
        r"^finetune_lr must be finite and > 0, got nan", id="operator/finetune-lr-nan"),
    row(operator("gradient_clipping", finetune_steps=-2), ValueError,
        r"^finetune_steps must be an int >= 0, got -2", id="operator/finetune-steps-negative"),
    row(operator("gradient_clipping", sigma=None, epsilon=-1.0), ValueError,
        r"epsilon must be finite and > 0, got -1\.0", id="operator/epsilon-negative"),
    # ---- building the data: masks, shapes, dtypes, devices, NaN images
    row(from_masks(fine=fine_outside_coarse_on_image_2, has_fine=with_value(0, False, BOOL)), ValueError,
        r"fine mask is not inside the coarse mask: .* first at image index 2", id="data/fine-not-inside-coarse"),
    row(from_masks(coarse=with_value((1, 0, 0), 2, torch.int64)), ValueError,
        r"coarse must be binary \(0/1 or bool\): found value 2", id="data/non-binary-coarse"),
    row(from_masks(fine=with_value((0, 2, 2), 0.5, torch.float32)), ValueError,
        r"fine must be binary .*found value 0\.5", id="data/non-integer-fine"),
    row(from_masks(has_fine=with_value(1, 3, torch.int64)), ValueError, r"has_fine must be binary .*found value 3",
        id="data/non-binary-has-fine"),
    row(from_masks(images=lambda t: t[0]), ValueError,
        r"images must be \(N, C, H, W\) or \(N, C, D, H, W\), got shape \(3, 6, 6\)",
        id="data/images-3d"),
    row(from_masks(coarse=lambda t: t[:, :, :5]), ValueError, r"coarse must be \(N, H, W\) = \(3, 6, 6\).*\(3, 6, 5\)",
        id="data/coarse-wrong-shape"),
    row(from_masks(fine=lambda t: t[:2]), ValueError, r"coarse and fine must have the same shape",
        id="data/fine-wrong-shape"),
    row(from_masks(has_fine=lambda t: t[:2]), ValueError, r"has_fine must be \(3,\), got \(2,\)",
        id="data/has-fine-wrong-shape"),
    row(from_masks(images=lambda t: (t * 255).to(torch.uint8)), TypeError,
        r"images must be floating point, got torch\.uint8", id="data/images-uint8"),
    row(from_masks(fine=lambda t: t.to("meta")), ValueError, r"same device.*fine on meta", id="data/fine-on-meta"),
    row(call(masks.forget_retain, lambda: torch.ones(2, 4, 4), lambda: torch.eye(4).expand(2, 4, 4) * 2), ValueError,
        r"fine must be binary .*found value 2", id="masks/non-binary-fine"),
    row(call(masks.forget_retain, lambda: torch.zeros(3, 4, 4, dtype=BOOL), lambda: torch.ones(3, 4, 4, dtype=BOOL)),
        ValueError, r"fine mask is not inside the coarse mask: 48 pixels in 3 image",
        id="masks/fine-not-inside-coarse"),
    row(call(masks.coarsen, lambda: torch.full((4, 4), 0.5)), ValueError, r"fine must be binary .*found value 0\.5",
        id="masks/coarsen-non-integer"),
    row(call(masks.coarsen, lambda: torch.ones(5, dtype=BOOL)), ValueError, r"fine must have at least 2 dims",
        id="masks/coarsen-1d"),
    row(call(masks.coarsen, lambda: torch.ones(4, 4, dtype=BOOL), radius=-1), ValueError,
        r"radius must be a non-negative int, got -1", id="masks/coarsen-negative-radius"),
    # ---- the loss: shapes, dtypes, devices, masks, targets
    row(loss_call(logits=lambda t: t.long()), TypeError,
        r"logits must be a floating-point tensor, got dtype torch\.int64", id="loss/integer-logits"),
    row(loss_call(target=lambda t: t[:, :4]), ValueError, r"target must have shape \(2, 5, 3\).*got \(2, 4, 3\)",
        id="loss/target-wrong-shape"),
    row(loss_call(mask=lambda t: t[None]), ValueError, r"mask must have shape \(2, 5, 3\).*got \(1, 2, 5, 3\)",
        id="loss/mask-wrong-shape"),
    row(loss_call(mask=with_value((1, 2, 2), 2, torch.int64)), ValueError, r"mask must be binary .*found value 2",
        id="loss/non-binary-mask"),
    row(loss_call(mask=with_value((0, 0, 1), 0.25, torch.float16)), ValueError,
        r"mask must be binary .*found value 0\.25", id="loss/non-integer-mask"),
    row(loss_call(target=lambda t: t.float()), TypeError, r"target must hold integer class indices for K=3",
        id="loss/float-target"),
    row(loss_call(target=with_value((1, 4, 2), 3, torch.int64)), ValueError,
        r"target values must be in \[0, 2\] for logits with K=3, found range \[0, 3\]", id="loss/target-out-of-range"),
    row(loss_call(mask=lambda t: t.to("meta")), ValueError, r"same device.*mask on meta", id="loss/mask-on-meta"),
    row(loss_call(weight=lambda _: torch.ones(2, requires_grad=True)), ValueError, r"weight is a constant",
        id="loss/weight-requires-grad"),
    row(loss_call(weight=lambda _: torch.ones(3)), ValueError, r"weight must have shape \(2,\)",
        id="loss/weight-wrong-shape"),
    # ---- malformed files
    row(truncated_isic_image, ValueError, rf"cannot read image file .*{isic_id(1)}\.jpg", id="loader/truncated-image"),
    row(isic_missing_mask, ValueError, rf"1 image\(s\) .* have no mask .*'{isic_id(2)}'", id="loader/missing-mask"),
    row(isic_csv_missing_column, ValueError, r"labels CSV .*GroundTruth\.csv is missing column\(s\) \['MEL'\]",
        id="loader/csv-missing-column"),
    row(lambda tmp_path: folder(tmp_path, mask_missing=True), ValueError, r"1 image\(s\) in .*images have no mask.*'b'",
        id="loader/folder-missing-mask"),
    row(lambda tmp_path: folder(tmp_path, csv_text="image,diagnosis\na,1\nb,0\n"), ValueError,
        r"labels CSV .*labels\.csv is missing column\(s\) \['label'\]", id="loader/folder-csv-missing-column"),
    # ---- DP-SGD (only when pyunlearn.optim.dpsgd imports)
    row(dpsgd_case(set_grad("decoder.fuse.weight", NAN)), ValueError,
        r"gradient of 'decoder\.fuse\.weight' contains NaN or Inf", id="dpsgd/nan-gradient", needs=DPSGD),
    row(dpsgd_case(lambda m: None, check_clipped=True), ValueError, r"not written by PerSampleGradients\.clipped_sum_",
        id="dpsgd/plain-backward-gradient", needs=DPSGD),
    row(dpsgd_case(noise_multiplier=-1.0), ValueError, r"noise_multiplier must be finite and >= 0",
        id="dpsgd/noise-multiplier-negative", needs=DPSGD),
    row(dpsgd_case(max_grad_norm=0.0), ValueError, r"max_grad_norm must be finite and > 0",
        id="dpsgd/clip-norm-zero", needs=DPSGD),
]


# --------------------------------------------------------------------------------------------- test
def snapshot_model(model: Optional[nn.Module]) -> dict:
    """Parameters and buffers (meta tensors by shape and dtype only: they hold no values)."""
    if model is None:
        return {}
    out = {}
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        out[name] = (t.device, t.dtype, tuple(t.shape)) if t.is_meta else t.detach().clone()
    return out


def assert_same(a: Any, b: Any, where: str = "") -> None:
    """Deep equality of nested dicts / lists / tensors (NaN equal to NaN)."""
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and a.shape == b.shape, where
        if a.is_sparse:
            a, b = a.to_dense(), b.to_dense()
        same = torch.equal(a, b) or (a.is_floating_point() and torch.allclose(a, b, rtol=0, atol=0, equal_nan=True))
        assert same, where
    elif isinstance(a, dict):
        assert isinstance(b, dict) and a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert type(a) is type(b) and len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert isinstance(b, float) and math.isnan(b), where
    else:
        assert a == b, where


def step_counter(opt: torch.optim.Optimizer) -> int:
    return opt.step_count if isinstance(opt, CertifiedOptimizer) else opt.steps_taken


@pytest.mark.parametrize("build,exc,match", TABLE)
def test_hostile_input(build, exc, match, tmp_path):
    case = build(tmp_path)
    model_before = snapshot_model(case.model)
    opt = case.optimizer
    if opt is not None:
        state_before = copy.deepcopy(opt.state_dict())
        steps_before = step_counter(opt)
        complete = isinstance(opt, CertifiedOptimizer) and opt.step_count == opt.steps
        cert_before = opt.certificate().to_dict() if complete else None
    with pytest.raises(exc, match=match):
        case.action()
    assert_same(snapshot_model(case.model), model_before, "model")
    if opt is not None:
        assert step_counter(opt) == steps_before
        assert_same(opt.state_dict(), state_before, "optimizer.state_dict()")
        if isinstance(opt, CertifiedOptimizer):
            if complete:  # a refused extra step leaves the completed run's certificate as it was
                assert opt.certificate().to_dict() == cert_before
            else:
                with pytest.raises(CertificateError, match=rf"only {steps_before} of the {opt.steps} planned steps"):
                    opt.certificate()


def test_table_covers_every_item_of_the_list():
    """The issue's list, item by item, against the table's ids (a new row must not drop a category)."""
    ids = " ".join(p.id for p in TABLE)
    for needle in ("wrong-shape", "dtype", "meta", "nan-in-images", "inf-loss", "nan-gradient", "inf-gradient",
                   "empty-forget", "empty-retain", "non-binary", "non-integer", "not-inside-coarse", "epsilon",
                   "delta", "sigma", "c0", "c1", "c2", "lr", "steps", "several-devices", "sparse-gradient",
                   "model-changed-between-steps", "truncated-image", "missing-mask", "csv-missing-column"):
        assert needle in ids, needle


# ------------------------------------------------------------------------- accepted edge cases
def all_forget_every_image_fine() -> SegmentationUnlearningData:
    images, _, fine, _ = seg_tensors()
    return SegmentationUnlearningData.from_masks(images, torch.ones_like(fine), torch.zeros_like(fine),
                                                 torch.ones(N, dtype=torch.bool))


@pytest.mark.parametrize("data_fn", [empty_forget_data, all_forget_every_image_fine],
                         ids=["empty-forget-set", "every-pixel-forget-every-image-fine"])
def test_edge_cases_that_are_valid_run_and_are_certified(data_fn):
    """Empty forget set: the retain set (and so the operator and its certificate) is well defined.
    Every pixel forget on fine-labelled images: all pixels are retained, relabelled to background.
    sigma = 1 certifies a moderate epsilon; a tiny sigma is refused (next test)."""
    data = data_fn()
    assert data.retain.any()
    if data_fn is empty_forget_data:
        assert not data.forget.any()
    else:
        assert data.forget.all() and (data.target == 0).all()
    model = tiny_model()
    before = snapshot_model(model)
    out, record = unlearn.gradient_clipping(model, data, steps=2, finetune_steps=0, batch_size=2, sigma=1.0,
                                            noise_seed=1)
    assert_same(snapshot_model(model), before, "input model")
    cert = record["certificate"]
    assert cert is not None and math.isfinite(cert["epsilon"]) and 0 < cert["epsilon"] < 20
    assert all(torch.isfinite(p).all() for p in out.parameters())


def test_tiny_sigma_is_refused_for_the_samplers_share_of_delta():
    """sigma = 0.01: epsilon is in the hundreds, so the sampler's share of delta, (1 + e^eps) T d 2^-62,
    exceeds 10% of delta and the certificate is refused (the input model is left as it was)."""
    model = tiny_model()
    before = snapshot_model(model)
    with pytest.raises(CertificateError, match=r"noise sampler.*more than 10% of delta"):
        unlearn.gradient_clipping(model, empty_forget_data(), steps=2, finetune_steps=0, batch_size=2, sigma=0.01,
                                  noise_seed=1)
    assert_same(snapshot_model(model), before, "input model")
