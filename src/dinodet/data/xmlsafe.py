"""Reading annotation XML (Pascal VOC, CVAT) as the untrusted input it is.

``defusedxml`` refuses entity declarations and external references before anything is expanded
or fetched: a billion-laughs file or an XXE probe costs nothing and gives one line naming it.
"""
from __future__ import annotations

import math
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError

import defusedxml.ElementTree as SafeET
from defusedxml import DefusedXmlException

from ..errors import first_line
from .report import DatasetError


class UnsafeXMLError(DatasetError):
    """An XML file declares entities or external references (billion laughs, XXE): refused unread."""


def parse_xml(path: Path) -> Element:
    """The root element of ``path``.

    Raises:
        UnsafeXMLError: entity declarations / external references (nothing expanded).
        DatasetError: unreadable or not well-formed XML.
    """
    try:
        return SafeET.parse(path, forbid_dtd=False, forbid_entities=True, forbid_external=True).getroot()
    except DefusedXmlException:
        raise UnsafeXMLError(f"'{path}': refused: the XML declares entities or external references "
                             "(billion laughs / external entity); nothing was expanded") from None
    except ParseError as e:
        raise DatasetError(f"'{path}': not well-formed XML ({first_line(e)})") from None
    except OSError as e:
        raise DatasetError(f"cannot read '{path}': {first_line(e)}") from None


def child_text(element: Element, tag: str) -> str | None:
    """Stripped text of the first ``tag`` child, ``None`` when absent or empty."""
    child = element.find(tag)
    text = child.text.strip() if child is not None and child.text else ""
    return text or None


def number(text: str | None) -> float | None:
    """A finite number written in an attribute or element, else ``None``."""
    try:
        value = float(text) if text is not None else None
    except ValueError:
        return None
    return value if value is not None and math.isfinite(value) else None
