"""Learning (TensorFlow/Keras): backbones and heads, frozen features, head fitting, probability calibration, ensembles, saliency."""
