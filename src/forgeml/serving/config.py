"""The serve section: the model server's options."""

from __future__ import annotations

from typing import Annotated

from pydantic import Field, PositiveInt

from forgeml.section import Section


class ServeConfig(Section):
    """Model server options (`forgeml serve`; its flags override them)."""

    variant: str = Field("recommended", description="a compress variant, recommended, or trained")
    host: str = Field("127.0.0.1", description="the address to bind; 0.0.0.0 to accept other machines")
    port: Annotated[int, Field(ge=0, le=65535)] = 8000
    max_batch: PositiveInt = Field(32, description="inputs run together at most")
    max_wait_ms: Annotated[float, Field(ge=0)] = Field(5.0, description="how long the first input waits for more")
    max_queue: PositiveInt = Field(256, description="inputs waiting at most (those running excluded); then 503")
    timeout_s: Annotated[float, Field(gt=0)] = Field(10.0, description="a request not answered by then gets 504")
    api_key: str | None = Field(None, description="required as 'Authorization: Bearer KEY' on /v1/*")
    threads: PositiveInt | None = Field(None, description="threads the model runs with (default: torch's)")
    max_items: PositiveInt = Field(64, description="inputs in one request at most")
    max_text_chars: PositiveInt = Field(10_000, description="characters in one text at most")
    max_body_bytes: PositiveInt = Field(1_000_000, description="request body size at most")
    max_new_tokens: PositiveInt = Field(512, description="tokens one generate request may ask for at most")
