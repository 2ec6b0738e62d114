"""The built-in configs: `tlflax train --config NAME[:ARGS]` finds them by name (tlflax/help.py)."""
