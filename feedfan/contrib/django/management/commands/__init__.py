"""``manage.py feedfan``."""
