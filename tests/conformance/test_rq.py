"""The conformance suite against ``rq``: real ``rq worker`` processes on Redis."""

from feedfan.testing import DispatcherConformance


class TestRQ(DispatcherConformance):
    dispatcher = "rq"
    broker = "redis"
