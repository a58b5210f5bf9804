"""The one base of the errors a user can act on, shared by library code and binaries.

The binaries print a `UserError` as one line and exit 1; any other exception is a bug and keeps its
traceback. Library modules raise subclasses (bad weights, images, indexes, settings, downloads).
"""


class UserError(Exception):
  """A problem with the user's input, files or settings; str() is one line a person can act on."""


class SettingsError(UserError, ValueError):
  """A setting (a flag, or the argument it became) that the library refuses."""
