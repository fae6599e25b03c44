"""ort: the transformed graph exported to ONNX (ONNX Runtime contrib ops) and run by onnxruntime."""
