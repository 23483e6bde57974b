"""Torch side of wmaudit: models, Uchida embedding, seeded training and ONNX export
(with a key file and a manifest that maps every marked parameter into the graph)."""
