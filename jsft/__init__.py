"""jsft: supervised fine-tuning of chat language models in JAX/Flax NNX."""

__version__ = "0.1.0"
