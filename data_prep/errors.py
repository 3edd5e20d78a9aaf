"""The one error data_prep raises for bad input. It lives here, importing nothing, because data_prep
is the bottom layer: ``dpo_zoo`` imports ``data_prep``, never the reverse (``dpo_zoo.errors``
re-exports this class and counts it among the errors the CLI prints without a traceback)."""


class DataError(ValueError):
    """Bad input data: the message names file, row and field."""
