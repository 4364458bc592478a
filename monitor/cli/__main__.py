"""`python -m monitor.cli`: the same entry point as the `collapse-monitor` script."""

from monitor.cli import main

main()
