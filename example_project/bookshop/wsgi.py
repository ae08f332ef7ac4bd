"""The WSGI application, for ``manage.py runserver`` (the async page works too)."""

import os

from django.core.wsgi import get_wsgi_application

from catalogue.latency import install_from_settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bookshop.settings")
application = get_wsgi_application()
install_from_settings()  # as in asgi.py: served pages only
