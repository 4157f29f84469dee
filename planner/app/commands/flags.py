"""Flag values that are more than one int or name: --documents MEAN[:MAX] and lists like --seq-chunks 1,2,4.
Each parser turns the text into a checked value or one BadInput line naming the flag."""
from __future__ import annotations

from planner.core.errors import BadInput


def parse_documents(text: str | None):
    """--documents MEAN[:MAX] (tokens): a DocumentMix, or None; BadInput for anything else."""
    from pydantic import ValidationError

    from planner.core.plan import DocumentMix

    if text is None:
        return None
    try:
        parts = [int(x) for x in text.split(":")]
        if len(parts) > 2 or min(parts) <= 0:
            raise ValueError
    except ValueError:
        raise BadInput(f"--documents {text!r}: want MEAN or MEAN:MAX, positive token counts (e.g. 32768:524288)") \
            from None
    from planner.core.limits import MAX_SEQ_LEN

    if max(parts) > MAX_SEQ_LEN:  # a document is at most a sequence
        raise BadInput(f"--documents {text!r}: {max(parts)} tokens is past the sequence cap of {MAX_SEQ_LEN:,}; "
                       "give at most that")
    try:
        return DocumentMix(mean_tokens=parts[0], max_tokens=parts[1] if len(parts) == 2 else None)
    except ValidationError as e:
        raise BadInput(f"--documents {text!r}: " + e.errors()[0]["msg"].removeprefix("Value error, ")) from None


# values one list flag may hold: each is a whole search dimension
MAX_LIST_ITEMS = 64


def parse_int_list(flag: str, text: str, cap: int | None = None) -> tuple[int, ...]:
    """'1,2,4' -> (1, 2, 4) (duplicates dropped), each positive and at most cap; BadInput otherwise."""
    try:
        vals = tuple(dict.fromkeys(int(x) for x in text.split(",")))
        if min(vals) <= 0:
            raise ValueError
    except ValueError:
        raise BadInput(f"{flag} {text!r}: want positive integers separated by commas (e.g. 1,2,4,8)") from None
    if len(vals) > MAX_LIST_ITEMS:
        raise BadInput(f"{flag}: {len(vals)} values, past the cap of {MAX_LIST_ITEMS}; give fewer")
    if cap is not None and max(vals) > cap:
        raise BadInput(f"{flag} {max(vals)} is past the cap of {cap:,}; give at most {cap:,}")
    return vals
