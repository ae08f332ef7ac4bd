from django.db import models
from django_async_backend.db.models.base import AsyncModelMixin


class Item(AsyncModelMixin, models.Model):
    """benchapp.Item's table, seen through django-async-backend (contender D)."""

    bucket = models.IntegerField(db_index=True)
    name = models.CharField(max_length=60)
    value = models.IntegerField()
    score = models.FloatField()
    flag = models.BooleanField()
    created = models.DateTimeField()

    class Meta:
        app_label = "dapp"
        db_table = "benchapp_item"
        managed = False

    def __str__(self) -> str:
        return self.name
