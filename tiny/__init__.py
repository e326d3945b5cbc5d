"""MemFlow-Tiny: a story world, its oracle and small models, on which the whole method runs on a CPU.

It imports the product (memflow, pipeline, trainer, utils) and is never imported by it.
"""
