"""Keyed models (source document 003): block-wise image encryption and a key-transformed ViT, on ONNX.

Modules: ``keys`` (client key files ``wmaudit-keyed/1``), ``cipher`` (block-wise
encryption of model inputs), ``model`` (locating the patch and position
embeddings in an ONNX graph, the model transformation, parity), ``inputs``
(reading data files), ``verify`` (accuracy with the right key, plain images and
wrong keys, and under deployment attacks), ``trace`` (which issued key a leaked
keyed file carries; what an attacker holding the plain model recovers).
"""
