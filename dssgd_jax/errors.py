"""User-facing errors.

Anything a user can get wrong (a flag value, a missing or corrupt file) raises a
subclass of :class:`UserError` whose message is one plain sentence naming the
flag or file and what is wrong. The command-line entry points catch
``UserError``, print the sentence to stderr and exit with status 2, without a
traceback.
"""


class UserError(Exception):
  """An error caused by user input; its message is shown without a traceback.

  ``exit_status`` is the command's exit status (2; 130 for an interrupt).
  """
  exit_status = 2


class ConfigError(UserError):
  """A flag value is invalid or contradicts another flag."""


class DataError(UserError):
  """A dataset cannot be found, read or partitioned as requested."""


class NonFiniteError(UserError):
  """Training produced a non-finite loss."""


class Interrupted(UserError):
  """The user pressed Ctrl-C; the message names the last checkpoint."""
  exit_status = 130
