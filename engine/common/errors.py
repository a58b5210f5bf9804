"""The error type for problems with a user's input, shared by library code and binaries."""


class UserError(Exception):
  """A problem with the user's input or files, reported in one line without a traceback."""
