"""The conformance suite against ``local``, the embedded default: in-process threads."""

from feedfan.testing import DispatcherConformance


class TestLocal(DispatcherConformance):
    dispatcher = "local"


class TestLocalOnRedis(DispatcherConformance):
    """``local`` threads writing to real Redis feeds."""

    dispatcher = "local"
    broker = "redis"
