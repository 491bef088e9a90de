"""The PyTorch reference model and its ONNX export (the build side; needs torch)."""
