"""TFDS builders. Each writes array_record and is read back without TensorFlow."""
