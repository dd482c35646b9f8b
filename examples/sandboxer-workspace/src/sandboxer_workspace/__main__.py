"""``python -m sandboxer_workspace``: print the package's config dir."""

from sandboxer_workspace import config_dir

print(config_dir())
