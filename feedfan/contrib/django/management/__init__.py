"""Management commands of feedfan's Django app."""
