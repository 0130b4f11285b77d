"""The error of a generation or export request that cannot be served."""


class InferenceError(RuntimeError):
    """A model, request or checkpoint the inference code cannot serve; the message says why."""
