"""Classification heads. The output layer starts at zero: step-0 loss is log(C)."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


class Head(nn.Module):
    """Optional hidden layer (Keras recipe: Dense 1024, ReLU, Dropout 0.5), then logits."""

    num_classes: int
    hidden: int = 0  # 0: none; else width of a Dense + ReLU layer before the output
    dropout: float = 0.0  # on the head's input (or the hidden activations when hidden > 0)
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x, *, train: bool = False):
        if self.hidden:
            x = nn.relu(nn.Dense(self.hidden, dtype=self.dtype, name="hidden")(x))
        x = nn.Dropout(self.dropout)(x, deterministic=not train)
        logits = nn.Dense(
            self.num_classes,
            dtype=self.dtype,
            kernel_init=nn.initializers.zeros,
            bias_init=nn.initializers.zeros,
            name="out",
        )(x)
        return logits.astype(jnp.float32)
