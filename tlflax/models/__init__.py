"""Model families (ResNet, ViT, EfficientNet-Lite, VGG) behind one registry."""

from tlflax.models.common import Classifier, ModelSpec, available, create_model
from tlflax.models.heads import Head

__all__ = ["Classifier", "Head", "ModelSpec", "available", "create_model"]
