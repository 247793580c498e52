"""Who follows whom, and the pins they post."""

from django.conf import settings
from django.db import models
from django.utils import timezone

from feedfan import Activity


class Follow(models.Model):
    """``follower`` sees ``target``'s pins in their feed."""

    follower = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="following"
    )
    target = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="followers"
    )
    created_at = models.DateTimeField(default=timezone.now)

    class Meta:
        constraints = [models.UniqueConstraint(fields=["follower", "target"], name="unique_follow")]

    def __str__(self) -> str:
        return f"{self.follower_id} follows {self.target_id}"


class Pin(models.Model):
    """Something a user pinned; its activity is fanned out to their followers."""

    author = models.ForeignKey(
        settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="pins"
    )
    title = models.CharField(max_length=200)
    image_url = models.URLField(blank=True)
    created_at = models.DateTimeField(default=timezone.now, db_index=True)

    def __str__(self) -> str:
        return self.title

    def activity(self) -> Activity:
        """The feedfan activity of this pin: the author pinned it, at its creation time."""
        return Activity(
            actor=self.author_id,
            verb="pin",
            object=self.pk,
            time=self.created_at,
            extra={"title": self.title},
        )
