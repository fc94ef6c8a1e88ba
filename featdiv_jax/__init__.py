"""featdiv_jax: multi-head SE-ResNets with a cosine feature-map diversity penalty, in JAX/Flax."""

__version__ = "0.1.0"
