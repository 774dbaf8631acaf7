"""Cluster description, fitted compute and network models, the step-time estimator, the profiler.

Nothing here imports torch at module level: the profiler imports it lazily.
"""
