"""FlexMoE: dynamic expert placement for Mixture-of-Experts training.

This package holds only the `flexmoe` command's thin glue; the work lives in `cost_models`,
`planner`, `runtime` and `experiments`.
"""

__version__ = "0.1.0"
