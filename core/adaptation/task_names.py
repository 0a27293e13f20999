"""Evaluation task names, importable without torch (the job service validates specs with them).

`core.adaptation.evaluate` maps each name to its function and checks the two lists agree.
"""

MODEL_TASKS: tuple[str, ...] = (
    "symbols_per_token",
    "bits_per_char",
    "copy_ru",
    "copy_en",
    "mc_ruworldtree",
    "mera_arith",
)
MICRO_AVG = "micro_avg"
TASK_NAMES: tuple[str, ...] = (*MODEL_TASKS, MICRO_AVG)
