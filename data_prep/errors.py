"""The one exception type for bad user input to data_prep."""


class DataPrepError(Exception):
  """Bad input: the message is one line naming the file or option and the problem."""
