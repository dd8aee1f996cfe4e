"""Base class of every recipe section: typed, and strict about unknown keys."""

from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field

Probability = Annotated[float, Field(ge=0.0, lt=1.0)]

# Fields that decide nothing about a stage's results (when to write a log line, how many processes do the
# work, how much memory to hold): a change of them keeps what the stages wrote.
UNHASHED = {"hashed": False}


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    def hashed_dump(self) -> dict[str, Any]:
        """The fields that decide the results: what the stages' records and outputs are keyed on."""
        unhashed = {name for name, f in type(self).model_fields.items() if f.json_schema_extra == UNHASHED}
        return self.model_dump(mode="json", exclude=unhashed)
