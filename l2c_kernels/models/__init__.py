"""The bundled digits models: ``load("dit-digits")``, ``load("pixart-digits")``."""
from .registry import MODEL_NAMES, BundledModel, build, load

__all__ = ["MODEL_NAMES", "BundledModel", "build", "load"]
