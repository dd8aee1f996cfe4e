"""Compression: variants of a trained model (int8, ONNX Runtime, torch.compile), each measured
against the model it came from, and the one to serve."""
