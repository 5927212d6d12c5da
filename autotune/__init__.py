"""autotune: generated, tuned CUTLASS kernels for the latent Mixture-of-Experts layer.

``from autotune import LatentMoE`` gives the layer as an ``nn.Module``; ``latent_moe`` is its
functional form; ``python -m autotune --arch sm90`` tunes (or, without that GPU, compiles).
"""

from ._version import __version__
from .problem import PRESETS, LatentMoEProblem, from_hf_config, preset

__all__ = ["__version__", "LatentMoEProblem", "PRESETS", "preset", "from_hf_config",
           "LatentMoE", "latent_moe"]


def __getattr__(name):
    # The module and op pull in torch; keep `import autotune` light for the build tooling.
    if name in ("LatentMoE", "latent_moe"):
        from . import ops
        return getattr(ops, name)
    raise AttributeError(f"module 'autotune' has no attribute {name!r}")
