"""The conformance suite against ``eager``: every chunk inline, through the JSON codec."""

from feedfan.testing import DispatcherConformance


class TestEager(DispatcherConformance):
    dispatcher = "eager"
