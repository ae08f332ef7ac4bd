from django.apps import AppConfig


class AsynchrormousConfig(AppConfig):
    name = "asynchrormous"
    verbose_name = "asynchrormous"

    def ready(self) -> None:
        from . import checks  # noqa: F401  (registers the system checks)
