"""ONNX -> deployable artifacts: the artifact directory and its manifest (precision variants and
TensorRT engines build on this)."""
