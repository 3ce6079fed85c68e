"""Conventions of the command-line entry points: bad input is one `error: ...` line on stderr and
exit status 2 (absl's own flag errors would print the usage and exit 1)."""

import sys
from typing import List, NoReturn

from absl import flags

EXIT_BAD_INPUT = 2


def fail(message: str) -> NoReturn:
  """Prints `error: <first line of message>` on stderr and exits with status 2."""
  lines = str(message).strip().splitlines()
  print(f'error: {lines[0] if lines else "bad input"}', file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def parse_flags(argv: List[str]) -> List[str]:
  """absl flag parsing for `app.run(..., flags_parser=parse_flags)`; a bad flag -> `fail`."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(str(e))
