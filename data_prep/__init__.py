"""Dataset preprocessors: read, normalise and validate preference data, then tokenize it (see schema.py)."""
