"""The bundled digits models, a plug-in on top of the library: ``load("dit-digits")``, ``sample(...)``.

Importing this package registers the models' denoiser builder and their names with the library
(``sampling.conditioning.register_pipeline`` / ``register_model_names``); ``import l2c_kernels`` does so.
"""
from . import denoisers  # noqa: F401  (registers the bundled models with the library)
from .registry import MODEL_NAMES, BundledModel, build, load
from .sample import sample, timesteps_for

__all__ = ["MODEL_NAMES", "BundledModel", "build", "load", "sample", "timesteps_for"]
