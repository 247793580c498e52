"""What the views and the seed command do: save rows and fan out, in one transaction.

The manager is called inside ``transaction.atomic()``; ``DjangoManager``
sends the fanout when the transaction commits, and never if it rolls back.
"""

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction

from feedfan import FanoutReceipt
from feedfan.contrib.django import get_manager
from pins.models import Follow, Pin


def post_pin(
    author: AbstractBaseUser, *, title: str, image_url: str = ""
) -> tuple[Pin, FanoutReceipt]:
    """Save a pin and fan it out to the author's followers once it is committed."""
    with transaction.atomic():
        pin = Pin.objects.create(author=author, title=title, image_url=image_url)
        receipt = get_manager().add_user_activity(author.pk, pin.activity())
    return pin, receipt


def delete_pin(pin: Pin) -> FanoutReceipt:
    """Delete a pin and remove it from every feed once the deletion is committed."""
    with transaction.atomic():
        activity = pin.activity()
        pin.delete()
        return get_manager().remove_user_activity(activity.actor, activity)


def follow(follower: AbstractBaseUser, target: AbstractBaseUser) -> FanoutReceipt:
    """Follow ``target`` and copy their pins into the follower's feed."""
    with transaction.atomic():
        Follow.objects.get_or_create(follower=follower, target=target)
        return get_manager().follow_user(follower.pk, target.pk)


def unfollow(follower: AbstractBaseUser, target: AbstractBaseUser) -> FanoutReceipt:
    """Stop following ``target`` and remove their pins from the follower's feed."""
    with transaction.atomic():
        Follow.objects.filter(follower=follower, target=target).delete()
        return get_manager().unfollow_user(follower.pk, target.pk)
