"""The conformance suite against Celery: real ``celery worker`` processes on Redis and RabbitMQ."""

from feedfan.testing import DispatcherConformance


class TestCeleryRedis(DispatcherConformance):
    """Celery with a Redis broker (visibility timeout, kombu's restore sweep)."""

    dispatcher = "celery"
    broker = "redis"


class TestCeleryRabbitMQ(DispatcherConformance):
    """Celery with a RabbitMQ broker (redelivery when the connection closes)."""

    dispatcher = "celery"
    broker = "amqp"
