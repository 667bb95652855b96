"""The one exception type for bad user input: its message names the culprit and the valid choices."""


class BitbertError(Exception):
  """Bad input (config field, data file, checkpoint tensor). `main` prints it without a traceback."""
