"""``validation: strict`` for HL7 v2 routes: structure conformance with hl7apy.

The hot path never builds an object model (see :mod:`middleware.formats.hl7v2`). A route that
sets ``validation: strict`` additionally has every message checked by hl7apy against the message
structure of its version and type (segment order, groups, cardinality, required elements, data
types); a message that does not conform fails at stage ``parse`` and is dead-lettered. hl7apy
reads about 25-80 messages per second per core, so strict routes are for low-volume feeds
(or for a while, to find out what a sender really sends).

Errors name structural elements only (``ORM_O01_ORDER_DETAIL``, ``PID_7``), never values: hl7apy's
own messages may quote field contents, which can be PHI.
"""

from __future__ import annotations

import re
import warnings

from middleware.errors import ParseError
from middleware.formats.hl7v2 import Hl7Message

_STRUCTURAL_NAME = re.compile(
    r"\b(?:[A-Z]{3}_[A-Z]\d{2}(?:_[A-Z0-9]+)*"  # message structures and groups: ORM_O01_ORDER_DETAIL
    r"|[A-Z][A-Z0-9]{2}_\d+(?:_\d+)*"  # segment fields and components: PID_7, CM_MSG_3
    r"|[A-Z]{2,3}_[A-Z]{2,4}_\d+)\b"  # data type components: CWE_1
)


def supported_versions() -> list[str]:
    """HL7 versions hl7apy knows the structures of."""
    from hl7apy import SUPPORTED_LIBRARIES

    return sorted(SUPPORTED_LIBRARIES)


def check_structure(message: Hl7Message) -> None:
    """Raise :class:`ParseError` unless ``message`` conforms to its version's message structure."""
    from hl7apy.consts import VALIDATION_LEVEL
    from hl7apy.exceptions import HL7apyException
    from hl7apy.parser import parse_message

    version = message.version or ""
    if version not in supported_versions():
        raise ParseError(f"strict validation: HL7 version {version or '(none in MSH-12)'} is not supported",
                         hint=f"supported: {', '.join(supported_versions())}; or set validation: lenient")
    text = "\r".join(segment.raw for segment in message.segments)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            parsed = parse_message(text, validation_level=VALIDATION_LEVEL.STRICT, find_groups=True)
            parsed.validate()
    except (HL7apyException, ValueError, TypeError, KeyError, IndexError) as exc:
        names = list(dict.fromkeys(_STRUCTURAL_NAME.findall(str(exc))))
        where = f" ({', '.join(names[:4])})" if names else ""
        raise ParseError(
            f"does not conform to HL7 {version} {message.message_type or ''} structure: "
            f"{type(exc).__name__}{where}",
            hint="fix the sender, or set validation: lenient on the route") from None
