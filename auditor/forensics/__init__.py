"""Forensics: undoing obfuscation (canon, align), scanning a file with many keys (scan), provenance tests."""
