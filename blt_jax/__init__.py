"""blt_jax: the Byte Latent Transformer in JAX/Flax."""
