"""The one XML parser entry point: every byte of XML the gateway reads goes through here.

Rules this module owns:
- No DTD at all (a DOCTYPE is refused, so no entity, internal or external, can ever expand),
  no network, no huge trees.
- Comments and processing instructions are dropped at parse time. libxml2 then merges the
  text around them, so ``<NameID>a<!-- x -->b</NameID>`` reads as ``ab``: the same text that
  exclusive c14n (without comments) signs. Reading ``.text`` can never see half a value.
- lxml errors become ``InvalidAssertion("malformed")``; a DOCTYPE is ``InvalidAssertion("dtd")``.
"""

from __future__ import annotations

from lxml import etree

from gateway.errors import InvalidAssertion

# One module-level parser: lxml parsers are not thread-safe, but the gateway parses only on
# its single asyncio thread, and a parser built once saves its setup on every request.
_PARSER = etree.XMLParser(
    resolve_entities=False,  # never expand an entity, even a predefined-looking one
    no_network=True,  # never fetch a DTD or schema over the network
    load_dtd=False,  # never read an external DTD subset
    dtd_validation=False,
    remove_comments=True,  # comments are not signed by exc-c14n: drop them, merging text
    remove_pis=True,  # likewise processing instructions, which would split text too
    huge_tree=False,  # keep libxml2's depth and text-size limits
    remove_blank_text=False,  # whitespace is signed content
    collect_ids=False,  # ID lookups are done by the validator, not by libxml2's ID table
)


def hardened_parser() -> etree.XMLParser:
    """The parser for libraries that re-parse what we hand them (signxml's ``parser=``)."""
    return _PARSER


# How "<!DOCTYPE" looks in the encodings libxml2 detects by itself: a DOCTYPE is refused
# before parsing, so one that also breaks the parser (an unresolvable parameter entity, an
# external subset) is still reported as "dtd" rather than "malformed".
_DOCTYPE_MARKS = tuple("<!DOCTYPE".encode(codec) for codec in ("ascii", "utf-16-le", "utf-16-be"))


def parse_xml(data: bytes) -> etree._Element:
    """Parse ``data`` with the hardened parser; refuse any DOCTYPE."""
    if any(mark in data for mark in _DOCTYPE_MARKS):
        raise InvalidAssertion("dtd", "a DOCTYPE is not allowed")
    try:
        root = etree.fromstring(data, parser=_PARSER)
    except (etree.XMLSyntaxError, etree.ParserError, ValueError) as exc:
        # ValueError: lxml refuses some inputs (e.g. an encoding declaration on str) that way
        raise InvalidAssertion("malformed", f"not well-formed XML ({type(exc).__name__})") from None
    if root is None:
        raise InvalidAssertion("malformed", "no document element")
    docinfo = root.getroottree().docinfo
    # A DOCTYPE of any kind is refused: SAML never needs one, and entities hide behind it.
    if docinfo.internalDTD is not None or docinfo.externalDTD is not None or docinfo.doctype:
        raise InvalidAssertion("dtd", "a DOCTYPE is not allowed")
    return root
