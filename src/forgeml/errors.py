"""User-facing errors: the CLI prints their message and exits 2, without a traceback."""


class ForgeError(Exception):
    """A problem with the user's input (file, row, column, option) and how to fix it."""


def first_line(error: BaseException) -> str:
    """An error's message, its first line alone (a library's own error, quoted inside ours)."""
    return (str(error).strip().splitlines() or [type(error).__name__])[0]


class RecipeError(ForgeError):
    """The recipe or a --set override is invalid."""


class DataError(ForgeError):
    """A data source cannot be read or does not fit the recipe."""


class RowError(DataError):
    """A problem with one row, found where the row's file and line are not known: the stage that
    read the source names them (``Table.where``)."""

    def __init__(self, row: int, reason: str) -> None:
        super().__init__(f"row {row}: {reason}")
        self.row, self.reason = row, reason


class NotOffered(ForgeError):
    """What a stage would do does not apply to this model (its architecture offers no student, no
    prunable layout, no export); the stage skips it and says why."""


class RunDirError(ForgeError):
    """The run directory is missing something, or holds a run that must not be overwritten."""
