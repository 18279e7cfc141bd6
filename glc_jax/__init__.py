"""glc-jax: GLCNet self-supervised pretraining for remote-sensing segmentation in JAX."""
