"""Hot-path ops. Every op has a pure-PyTorch reference (``pyunlearn.ops.reference``); fused backends
replace it where available."""
from .reference import (  # noqa: F401
    add_noise_,
    dpsgd_step_,
    global_norm,
    gradient_clipping_step_,
    masked_cross_entropy_fwd_bwd,
    model_clipping_step_,
)
from .rng import STREAM_INIT, STREAM_UPDATE, gaussian_noise  # noqa: F401


def backends() -> dict:
    """Which implementations are live, per op."""
    return {"reference": True}
