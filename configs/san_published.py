"""configs/san.py with the published U-CAM recipe instead of the project's defaults (see
PUBLISHED_MODEL and PUBLISHED_UCAM there, and docs/results.md for what each does).

  python -m ucam_jax.main --config=configs/san_published.py
"""

import ml_collections

from configs import san


def get_config() -> ml_collections.ConfigDict:
  config = san.get_config()
  config.model.update(san.PUBLISHED_MODEL)
  config.ucam.update(san.PUBLISHED_UCAM)
  return config
