"""Input types for request fields: every number that reaches SQLite, torch or the store is checked here.

- JSON numbers are strict: `true` is not 1, `2.0` is not an integer 2 and "0.5" is not a number (pydantic's
  lax mode would accept all three); an integer is a fine float.
- Floats are finite: Python's JSON parser reads NaN and Infinity, which a NOT NULL column or a sampler cannot use.
- Integers that reach SQLite fit its signed 64-bit INTEGER; a seed fits torch.Generator.manual_seed (SEED_MAX).
- Text must be encodable as UTF-8: JSON's "\\ud800" escapes decode to lone surrogates, which can be neither
  hashed nor stored.
Query parameters arrive as strings, so they cannot be strict; they are bounded instead (`SQL_INT_MAX`).
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import AfterValidator, BeforeValidator, Field

from ownlm.engine.base import SEED_MAX

SQL_INT_MAX = 2**63 - 1  # SQLite INTEGER is a signed 64-bit value
UNIX_MAX = 253_402_300_799  # 9999-12-31T23:59:59Z: the last second a datetime (and a date in the dashboard) holds


def _utf8(text: str) -> str:
    try:
        text.encode()
    except UnicodeEncodeError as e:
        raise ValueError(f"not valid Unicode text (a lone surrogate at character {e.start})") from None
    return text


def _not_bool(value):
    if isinstance(value, bool):  # Literal[-1, 1] would take True as 1
        raise ValueError("must be a number, not true or false")
    return value


StrictInt = Annotated[int, Field(strict=True)]
Thumbs = Annotated[Literal[-1, 1], BeforeValidator(_not_bool)]
FiniteFloat = Annotated[float, Field(strict=True, allow_inf_nan=False)]
Seed = Annotated[int, Field(strict=True, ge=0, le=SEED_MAX, description="RNG seed, 0..2**63")]
UnixTime = Annotated[float, Field(strict=True, allow_inf_nan=False, ge=0, le=UNIX_MAX, description="unix seconds, UTC")]
Text = Annotated[str, AfterValidator(_utf8)]
