"""Forensics: auditing files written by others, one at a time or by the thousand.

`canon` and `align` undo function-preserving obfuscation, `scan` judges a file
against many keys, `provenance` tests whether a suspect derives from the owner's
model, and `sweep` audits a corpus of ONNX files against many keys, each file in
a child process under a time and memory limit, on a local process pool or on Ray.
"""
