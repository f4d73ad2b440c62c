"""adm_jax: diffusion distillation (ADM / DMDX, DMD2, Diffusion2GAN) in JAX."""

__version__ = "0.1.0"
