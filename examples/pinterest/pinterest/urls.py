"""URLs of the pinterest example."""

from django.urls import include, path

urlpatterns = [path("", include("pins.urls"))]
