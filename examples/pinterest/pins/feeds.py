"""The project's feedfan manager: Stream Framework's ``MyStreamManager``, on the ORM.

Active followers (logged in recently) are fanned out to on the HIGH queue,
the others on LOW, so a burst of pins reaches the people who are looking first.
"""

from collections.abc import Iterator
from datetime import timedelta

from django.db.models import Q
from django.utils import timezone

from feedfan import FanoutPriority, TimelineFeed, UserFeed
from feedfan.contrib.django import DjangoManager
from pins.models import Follow

ACTIVE_FOR = timedelta(days=14)
"""A follower who logged in within this long is active: their feed is written first."""


def get_follower_ids(user_id: int, *, active: bool) -> Iterator[int]:
    """Ids of ``user_id``'s active (or inactive) followers, streamed from the database."""
    cutoff = timezone.now() - ACTIVE_FOR
    recent = Q(follower__last_login__gte=cutoff)
    follows = Follow.objects.filter(target_id=user_id).filter(recent if active else ~recent)
    return follows.order_by("follower_id").values_list("follower_id", flat=True).iterator()


class MyStreamManager(DjangoManager):
    """Pins go to every follower's timeline; active followers first."""

    feed_classes = {"timeline": TimelineFeed}
    user_feed_class = UserFeed

    def get_user_follower_ids(self, user_id: int) -> dict[FanoutPriority, Iterator[int]]:
        """Active followers on HIGH, inactive ones on LOW."""
        return {
            FanoutPriority.HIGH: get_follower_ids(user_id, active=True),
            FanoutPriority.LOW: get_follower_ids(user_id, active=False),
        }

    def get_user_follower_count(self, user_id: int) -> int:
        """One COUNT query, so ``planning = "auto"`` can decide without reading the ids."""
        return Follow.objects.filter(target_id=user_id).count()
