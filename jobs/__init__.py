"""Ray Job entry points: thin wrappers that parse, validate and call Backpack (see each module's docstring)."""
