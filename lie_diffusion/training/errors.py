"""The one exception a training run reports to its user."""


class TrainingError(Exception):
    """A problem the user can fix (bad input, diverged run): reported as one line, without a traceback."""
