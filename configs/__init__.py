"""The shipped configs. `python -m ucam_jax.main --config=configs/san.py` reads one from this
checkout; `--config=san` (or a configs/ path that is not there) reads the installed copy."""
