"""Model families behind one registry: one module each (tlflax.models.<family>), found and
registered on first use."""

from tlflax.models.common import Classifier, ModelSpec, available, create_model
from tlflax.models.heads import Head

__all__ = ["Classifier", "Head", "ModelSpec", "available", "create_model"]
