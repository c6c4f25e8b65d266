"""The building blocks of the config sections (llmflow/config.py): the base class that
refuses unknown keys, and the validated field types several sections share."""

from __future__ import annotations

from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict

from llmflow import trust


def check_bundles(value: list[dict[str, float]] | None) -> list[dict[str, float]] | None:
    """A vLLM replica's Ray resource bundles: at least one, each with positive amounts."""
    if value is not None:
        if not value:
            raise ValueError("give at least one bundle, e.g. [{CPU: 1}], or leave it empty")
        for bundle in value:
            if not bundle or any(amount <= 0 for amount in bundle.values()):
                raise ValueError(f"{bundle}: a bundle names resources with positive amounts")
    return value


Bundles = Annotated[list[dict[str, float]], AfterValidator(check_bundles)]  # a vLLM replica's
EnvVars = Annotated[dict[str, str], AfterValidator(trust.check_env_vars)]
EnvNames = Annotated[list[str], AfterValidator(trust.check_names)]


class Section(BaseModel):
    """Base of every config section: unknown keys rejected, assignments validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)
