from django.db import models

from asynchrormous import AsyncManager


class Item(models.Model):
    """The benchmark table: 4 buckets of 5,000 rows, seven columns of common types."""

    bucket = models.IntegerField(db_index=True)
    name = models.CharField(max_length=60)
    value = models.IntegerField()
    score = models.FloatField()
    flag = models.BooleanField()
    created = models.DateTimeField()

    # Plain Django's manager, for contenders A, B and C.
    plain = models.Manager()
    objects = AsyncManager()

    class Meta:
        app_label = "benchapp"
        default_manager_name = "objects"

    def __str__(self) -> str:
        return self.name


class Owner(models.Model):
    """W5: 50 owners, each with parts of 4 kinds, prefetched by 4 lookups."""

    name = models.CharField(max_length=60)

    plain = models.Manager()
    objects = AsyncManager()

    class Meta:
        app_label = "benchapp"
        default_manager_name = "objects"

    def __str__(self) -> str:
        return self.name


class Part(models.Model):
    owner = models.ForeignKey(Owner, models.CASCADE, related_name="parts")
    kind = models.IntegerField()
    name = models.CharField(max_length=60)

    plain = models.Manager()
    objects = AsyncManager()

    class Meta:
        app_label = "benchapp"
        default_manager_name = "objects"

    def __str__(self) -> str:
        return self.name
