"""ucam_jax: uncertainty-based class activation maps (U-CAM) for VQA in JAX/Flax.

The Python API is `ucam_jax.api` (`from ucam_jax import api`): `api.load` a trained run,
`api.answer` and `api.explain` questions about images, `api.overlay` / `api.figure` to draw the
maps. This file imports nothing, so `import ucam_jax` sets no global state and `ucam_jax.explain`
stays the module of the map methods.
"""
