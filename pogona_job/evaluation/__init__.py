"""How good the trained model is: validation passes with per-image results (`scoring`), intervals
(`uncertainty`), the ONNX export check (`export`) and the champion decision (`promotion`)."""
