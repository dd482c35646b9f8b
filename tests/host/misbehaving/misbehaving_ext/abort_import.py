"""A handler module that aborts the process that imports it."""

import os
import sys

sys.stderr.write("abort_import: aborting at import\n")
sys.stderr.flush()
os.abort()
