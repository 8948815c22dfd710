"""Learning (TensorFlow/Keras): backbones and heads, frozen features, head fitting, probability calibration, ensembles, saliency."""

from brainmri.core.machine import pool_tensorflow_memory

pool_tensorflow_memory()  # before any module of this package imports TensorFlow
