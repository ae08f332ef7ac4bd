"""The ASGI application that ``make demo`` serves with uvicorn (all three pages)."""

import os

from django.core.asgi import get_asgi_application

from catalogue.latency import install_from_settings

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "bookshop.settings")
application = get_asgi_application()
# Here rather than in AppConfig.ready(): only served pages pay the simulated latency,
# not migrate or the data generator.
install_from_settings()
