"""gendd_fast: fast, dependable training for Generative Distribution Distillation (GenDD).

Importing the package never needs a compiler, a GPU, Triton, DALI, torchvision or timm: the
optional accelerators are imported where they are used, and fall back with a one-line notice.
"""
from . import layout

layout.map_kernels()  # a source checkout: its top-level kernels/ is gendd_fast.kernels

from .diffusion import GaussianDiffusion, create_diffusion, space_timesteps  # noqa: E402
from .head import DiffLoss, SimpleMLPAdaLN  # noqa: E402
from .sampling import guided_sample  # noqa: E402

__version__ = "0.1.0"

__all__ = ["DiffLoss", "SimpleMLPAdaLN", "GaussianDiffusion", "create_diffusion",
           "space_timesteps", "guided_sample", "FusedDiffLoss", "__version__"]


def __getattr__(name):
    # FusedDiffLoss pulls in Triton; import it only when asked for.
    if name == "FusedDiffLoss":
        from .fused_head import FusedDiffLoss
        return FusedDiffLoss
    raise AttributeError(f"module 'gendd_fast' has no attribute {name!r}")
