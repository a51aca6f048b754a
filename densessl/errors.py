"""User-facing errors: the CLI prints them as one line, without a traceback."""


class DensesslError(Exception):
    """A problem with the user's input (recipe, data, files), not a bug in densessl."""


class RecipeError(DensesslError):
    """An invalid recipe key, type or value."""


class DataError(DensesslError):
    """Missing or malformed data on disk."""


class PairContractError(DensesslError):
    """A pair builder returned something that breaks the PairSample contract."""
