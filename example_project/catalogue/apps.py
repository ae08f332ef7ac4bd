from django.apps import AppConfig


class CatalogueConfig(AppConfig):
    name = "catalogue"

    def ready(self) -> None:
        # The one receiver of asynchrormous's job_finished: it files each background
        # job under the page that submitted it.
        from . import timeline

        timeline.connect()
