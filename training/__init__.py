"""edgeloop training: versioned datasets, trainers, champion/challenger gate, ONNX export."""
