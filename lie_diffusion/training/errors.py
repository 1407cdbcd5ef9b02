"""The exceptions a training run reports to its user."""


class TrainingError(Exception):
    """A problem the user can fix (bad input, diverged run): reported as one line, without a traceback."""


class DivergedError(TrainingError):
    """The loss became non-finite: an outcome of the settings (a benchmark records it as a result), where every
    other TrainingError is bad input that must stop a benchmark."""
