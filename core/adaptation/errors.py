"""Errors a user can cause (bad input), as opposed to bugs or system faults.

The CLI turns an `AdaptationInputError` into a one-line message and exit code 2; later the job service maps it
to a 4xx / a failed job of kind `user`.
"""


class AdaptationInputError(ValueError):
    """The input (file, corpus, tokenizer, model, option) is unusable; the message names the problem and `code`
    classifies it for machines (e.g. `empty_corpus`, `not_utf8`)."""

    def __init__(self, message: str, code: str = "invalid_input") -> None:
        super().__init__(message)
        self.code = code


class TrainingDiverged(AdaptationInputError):
    """The training loss became NaN or infinite (a learning rate or setting the model cannot take): the stage stops
    and writes no model."""

    def __init__(self, stage: str, step: int, loss: float) -> None:
        super().__init__(
            f"{stage} diverged: loss {loss} at step {step}; lower the learning rate (no model was written)",
            "training_diverged",
        )


class StageCancelled(Exception):
    """The run was asked to stop; the interrupted stage keeps its checkpoint and re-runs from it next time."""
