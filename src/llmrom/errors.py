"""User-facing errors: one line that names the problem and the fix.

The CLI prints ``str(err)`` of an :class:`LlmromError` and exits non-zero without a traceback;
anything else is a bug and keeps its traceback.
"""


class LlmromError(Exception):
    """A problem with the user's input or environment, explained in one line."""


class NonFiniteError(LlmromError):
    """A NaN or Inf appeared; the message names the layer where it was found."""


class BudgetError(LlmromError):
    """The budget cannot be met by the plan asked for (too few blocks, ranks already at 1, ...)."""
