"""ucam_jax: uncertainty-based class activation maps (U-CAM) for VQA in JAX/Flax."""
