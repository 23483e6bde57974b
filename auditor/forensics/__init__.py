"""Forensics: auditing files written by others, one at a time or by the thousand.

`sweep` audits a corpus of ONNX files against many keys, each file in a child
process under a time and memory limit, on a local process pool or on Ray.
"""
