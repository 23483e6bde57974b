"""Perceptual hashes from a network's intermediate layer (source document 004), ONNX only.

A hash is the centroid of the latents of a "Signal" image set (edited copies
of one image) and a radius R: an image matches when its latent lies within R
of the centroid. Latents are the features of any named tensor of any ONNX
model (exposed as a graph output), optionally reduced by PCA (fitted here) or
mapped by an encoder ONNX file (a VAE encoder, or a PCA exported as a Gemm).

Modules: ``inputs`` (reading image sets), ``features`` (exposing a tensor and
running the model), ``hashfile`` (the ``wmaudit-phash/1`` file), ``hashing``
(build, match, ROC), ``survive`` (decisions under deployment attacks),
``fingerprint`` (derived vs independent models from a probe set's features).
"""
