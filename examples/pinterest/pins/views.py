"""The feed page: a user's timeline, a form to pin, and who to follow.

There is no login in this example: the URL says whose page it is.
"""

from django.contrib.auth import get_user_model
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.http import require_POST

from feedfan.contrib.django import get_manager
from pins import services
from pins.models import Follow, Pin

FEED_PAGE_SIZE = 50


def index(request: HttpRequest) -> HttpResponse:
    """Every user, with a link to their feed."""
    users = get_user_model().objects.order_by("username")
    return render(request, "pins/index.html", {"users": users})


def feed(request: HttpRequest, username: str) -> HttpResponse:
    """``username``'s timeline: the pins of everyone they follow, newest first."""
    user = get_object_or_404(get_user_model(), username=username)
    if request.method == "POST":
        title = request.POST.get("title", "").strip()
        if title:
            services.post_pin(user, title=title[:200], image_url=request.POST.get("image_url", ""))
        return HttpResponseRedirect(reverse("feed", args=[username]))
    activities = get_manager().get_feed(user.pk)[:FEED_PAGE_SIZE]
    pins = Pin.objects.select_related("author").in_bulk([a.object for a in activities])
    # A pin deleted since its fanout may still be listed until its removal lands.
    items = [pins[a.object] for a in activities if a.object in pins]
    following = Follow.objects.filter(follower=user).values_list("target__username", flat=True)
    others = get_user_model().objects.exclude(pk=user.pk).exclude(username__in=following)
    return render(
        request,
        "pins/feed.html",
        {
            "owner": user,
            "items": items,
            "following": sorted(following),
            "others": others.order_by("username")[:20],
        },
    )


@require_POST
def follow(request: HttpRequest, username: str, target: str) -> HttpResponse:
    """``username`` follows ``target``; the target's pins are copied into their feed."""
    model = get_user_model()
    user = get_object_or_404(model, username=username)
    services.follow(user, get_object_or_404(model, username=target))
    return HttpResponseRedirect(reverse("feed", args=[username]))


@require_POST
def unfollow(request: HttpRequest, username: str, target: str) -> HttpResponse:
    """``username`` unfollows ``target``; the target's pins leave their feed."""
    model = get_user_model()
    user = get_object_or_404(model, username=username)
    services.unfollow(user, get_object_or_404(model, username=target))
    return HttpResponseRedirect(reverse("feed", args=[username]))
