"""blt_jax: the Byte Latent Transformer in JAX/Flax."""

from blt_jax import platforms as _platforms

# Before any module of the package starts jax: no libtpu probe on machines without TPUs (see blt_jax.platforms).
_platforms.quiet_start()
