"""Export: ONNX (fp32, dynamic INT8) and SmoothQuant."""
