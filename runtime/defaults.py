"""Re-placement defaults shared by `flexmoe train`, `TrainConfig`, `FlexMoERuntime` and the
benchmarks. Torch-free, so the CLI reads them without importing the runtime."""

# Re-plan early when the worst layer's balance (max over mean tokens per device) exceeds this: a
# plan change costs a few milliseconds, so a 10% imbalance already pays for one.
REPLAN_THRESHOLD = 1.1

# Background planning attempts that may fail in a row before a warning (runtime.replan).
PLANNER_FAILURE_LIMIT = 3
