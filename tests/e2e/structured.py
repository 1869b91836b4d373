"""A structured-output reply (what messages.parse(output_format=...) and responses.parse(
text_format=...) ask for): a JSON document, a line break in a string written as "\\n". Read as
prose, "\\n4242 4242 4242 4242" is a card glued to the letter n."""

from __future__ import annotations

import json

import pydantic


class Contact(pydantic.BaseModel):
    name: str
    notes: str


STRUCTURED = json.dumps({"name": "Jane", "notes": "paid with\n4242 4242 4242 4242 or jane.doe@example.com"})
REDACTED = Contact(name="Jane", notes="paid with\nCC_MASKED_LAST4_4242 or j***e@example.com")
