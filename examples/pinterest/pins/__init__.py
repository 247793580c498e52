"""Pins, follows and the feed page."""
