"""``python -m sandboxer.host``: the extension worker's entry point."""

from sandboxer.host.worker import main

main()
