from django.db import models


class Item(models.Model):
    """benchapp.Item's table with a plain Django manager, for W7's processes that are
    not asynchrormous: uncached Django, django-cachalot and django-cacheops."""

    bucket = models.IntegerField(db_index=True)
    name = models.CharField(max_length=60)
    value = models.IntegerField()
    score = models.FloatField()
    flag = models.BooleanField()
    created = models.DateTimeField()

    objects = models.Manager()

    class Meta:
        app_label = "cacheapp"
        db_table = "benchapp_item"
        managed = False

    def __str__(self) -> str:
        return self.name
