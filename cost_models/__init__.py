"""Cluster description, fitted compute and network models, the routing rule, the step-time
estimator, the profiler; and the bottom layer's shared utilities (`files`: reading, atomic
writing, InputError; `launch`: local worker processes), which every layer above uses.

Nothing here imports torch at module level: the profiler imports it lazily.
"""
