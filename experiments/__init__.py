"""Diagnostic experiments that still inform a decision (see experiments/README.md).

They import the product and MemFlow-Tiny and are never imported by either.
"""
