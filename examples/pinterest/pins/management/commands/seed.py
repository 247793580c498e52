"""``manage.py seed``: users, follows (active and inactive followers) and pins."""

import random
from datetime import timedelta
from typing import Any

from django.contrib.auth import get_user_model
from django.core.management.base import BaseCommand, CommandParser
from django.db import transaction
from django.utils import timezone

from pins import services
from pins.models import Follow

NAMES = (
    "alice",
    "bob",
    "carol",
    "dave",
    "erin",
    "frank",
    "grace",
    "heidi",
    "ivan",
    "judy",
    "mallory",
    "niaj",
    "olivia",
    "peggy",
    "rupert",
    "sybil",
    "trent",
    "victor",
    "walter",
    "yvonne",
)


class Command(BaseCommand):
    """Create sample users who follow each other, and let some of them pin."""

    help = "Create sample users, follows and pins; the pins are fanned out like real ones."

    def add_arguments(self, parser: CommandParser) -> None:
        """Sizes of the sample network."""
        parser.add_argument("--users", type=int, default=12, help="users to create (max 20)")
        parser.add_argument("--pins", type=int, default=2, help="pins per user")
        parser.add_argument("--seed", type=int, default=7, help="random seed")

    def handle(self, *args: Any, **options: Any) -> None:
        """Create the network, then post the pins one by one through the manager."""
        rng = random.Random(options["seed"])
        now = timezone.now()
        users = []
        with transaction.atomic():
            for number, name in enumerate(NAMES[: max(2, min(options["users"], len(NAMES)))]):
                # Every other user has been away for two months: an inactive follower.
                seen = now if number % 2 == 0 else now - timedelta(days=60)
                user, _ = get_user_model().objects.update_or_create(
                    username=name, defaults={"last_login": seen}
                )
                users.append(user)
            for user in users:
                for target in rng.sample([u for u in users if u != user], k=len(users) // 2):
                    Follow.objects.get_or_create(follower=user, target=target)
        receipts = []
        for number in range(options["pins"]):
            for user in users:
                _, receipt = services.post_pin(user, title=f"{user.username}'s pin #{number + 1}")
                receipts.append(receipt)
        # Inside a transaction the manager hands back a deferred receipt; after the
        # commit its `sent` attribute holds what was actually sent.
        chunks = sum((getattr(r, "sent", None) or r).chunks for r in receipts)
        self.stdout.write(
            f"{len(users)} users, {Follow.objects.count()} follows, {len(receipts)} pins "
            f"fanned out in {chunks} chunk task(s). Open /u/{users[0].username}/ to see a feed."
        )
