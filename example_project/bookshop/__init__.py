"""The bookshop demo project: settings, URLs and the ASGI/WSGI entry points."""
