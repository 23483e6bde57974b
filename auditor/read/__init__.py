"""Reading ONNX files safely: graph, every weight, torch layouts."""
