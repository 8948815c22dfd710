"""Exporting trained models: Keras to ONNX, static int8 quantization, and ensembles composed of exported graphs."""
