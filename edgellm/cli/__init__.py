"""The ``edgellm`` command line: one module per subcommand, each a thin shell over one
library call. The entry point is :func:`edgellm.cli.main.main`."""
