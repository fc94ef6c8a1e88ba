"""Command-line entry point (the training system lands with the training-loop issue)."""

import sys


def main(argv=None):
  del argv
  print("featdiv_jax: training is not implemented yet (model core only); "
        "see README.md for what exists.", file=sys.stderr)
  return 2


if __name__ == "__main__":
  sys.exit(main(sys.argv))
