"""A handler module with a side effect at import: it records who imported it (never the manager)."""

import json
import os
from pathlib import Path

from misbehaving_ext import MisbehavingExtension

(Path(__file__).parent / "imported-by.json").write_text(json.dumps({
    "pid": os.getpid(), "sentinel": "SANDBOXER_TEST_SENTINEL" in os.environ}))


class NoisyImport(MisbehavingExtension):
    pass
