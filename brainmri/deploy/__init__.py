"""Deployment: ONNX runtimes and `brainmri predict`. Never imports TensorFlow or the learning package."""
