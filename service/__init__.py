"""Online half: serves a ProtoNMF artifact with onnxruntime. Never imports torch."""
