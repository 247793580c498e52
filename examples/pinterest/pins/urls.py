"""URLs of the pins app."""

from django.urls import path

from pins import views

urlpatterns = [
    path("", views.index, name="index"),
    path("u/<str:username>/", views.feed, name="feed"),
    path("u/<str:username>/follow/<str:target>/", views.follow, name="follow"),
    path("u/<str:username>/unfollow/<str:target>/", views.unfollow, name="unfollow"),
]
