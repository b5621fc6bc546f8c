"""Benchmarks of the affinity layer and the local edge: ``python -m tests.bench`` (see ``__main__``).

Not collected by the default test run (pyproject's ``addopts`` ignores ``tests/bench``).
"""
