"""Evaluation task names, importable without torch (the job service validates specs with them).

`langadapt.core.adaptation.evaluate` maps each name to its function and checks the two lists agree.
"""

from typing import Literal, get_args

TaskName = Literal[
    "symbols_per_token",
    "bits_per_char",
    "copy_ru",
    "copy_en",
    "mc_ruworldtree",
    "mera_arith",
    "generation_speed",
    "micro_avg",
]
TASK_NAMES: tuple[str, ...] = get_args(TaskName)
MICRO_AVG = "micro_avg"
MODEL_TASKS: tuple[str, ...] = tuple(name for name in TASK_NAMES if name != MICRO_AVG)
MERA_TASKS = frozenset({"mc_ruworldtree", "mera_arith"})  # read the MERA folder
SOURCE_TASKS = frozenset({"copy_en"})  # need held-out source-language text
AVERAGED_TASKS = frozenset({"copy_ru", "copy_en", "mc_ruworldtree", "mera_arith"})  # enter micro_avg
