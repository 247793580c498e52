"""The conformance suite against ``dramatiq``: real ``dramatiq`` workers on Redis and RabbitMQ."""

from feedfan.testing import DispatcherConformance


class TestDramatiqRedis(DispatcherConformance):
    """Dramatiq's RedisBroker; the feeds in the same Redis."""

    dispatcher = "dramatiq"
    broker = "redis"


class TestDramatiqRabbitMQ(DispatcherConformance):
    """Dramatiq's RabbitmqBroker; the feeds in Redis."""

    dispatcher = "dramatiq"
    broker = "amqp"
