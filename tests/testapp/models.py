from django.contrib.contenttypes.fields import GenericForeignKey, GenericRelation
from django.db import models

from asynchrormous import AsyncManager, AsyncModelMixin


class Publisher(models.Model):
    name = models.CharField(max_length=100, unique=True)

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.name


class Author(models.Model):
    name = models.CharField(max_length=100)

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.name


class Book(AsyncModelMixin, models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, models.CASCADE, related_name="books")
    publisher = models.ForeignKey(Publisher, models.SET_NULL, null=True)
    pages = models.IntegerField(default=100)
    year = models.IntegerField(default=2000)
    published = models.DateField(null=True)
    sheets = models.GeneratedField(
        expression=models.F("pages") / 2,
        output_field=models.IntegerField(),
        db_persist=True,
    )

    objects = AsyncManager()

    class Meta:
        get_latest_by = "year"

    def __str__(self) -> str:
        return self.title


class Tag(models.Model):
    name = models.CharField(max_length=50)
    books = models.ManyToManyField(Book, related_name="tags")

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.name


class AuditEntry(models.Model):
    """A row that a custom QuerySet's override writes each time it runs."""

    action = models.CharField(max_length=50)

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.action


class Document(models.Model):
    """A JSONField, for values the field cannot encode."""

    data = models.JSONField()

    objects = AsyncManager()

    def __str__(self) -> str:
        return f"Document {self.pk}"


class Memo(Document):
    """Multi-table inheritance: an update of both tables selects the rows first."""

    title = models.CharField(max_length=100)


class Note(models.Model):
    """A value Django makes while it compiles the INSERT (auto_now)."""

    text = models.CharField(max_length=100)
    stamped = models.DateTimeField(auto_now=True)

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.text


class Label(models.Model):
    """A generic label: a GenericForeignKey, and GenericRelations pointing back.

    A filter across a GenericRelation looks up a ContentType while Django compiles
    the SQL (the join's extra condition), through ContentType's process-wide cache.
    """

    content_type = models.ForeignKey(
        "contenttypes.ContentType", models.CASCADE, related_name="+"
    )
    object_id = models.PositiveIntegerField()
    content_object = GenericForeignKey("content_type", "object_id")
    text = models.CharField(max_length=50)

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.text


class Shelf(models.Model):
    name = models.CharField(max_length=50)
    labels = GenericRelation(Label, related_query_name="shelf")

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.name


class Reader(models.Model):
    name = models.CharField(max_length=50)
    labels = GenericRelation(Label, related_query_name="reader")

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.name


class Gauge(models.Model):
    """A model whose default manager caches every queryset (AsyncManager(cache=))."""

    name = models.CharField(max_length=50)
    value = models.IntegerField(default=0)

    objects = AsyncManager(cache=True)
    fresh = AsyncManager()

    def __str__(self) -> str:
        return self.name


class GaugeReading(models.Model):
    gauge = models.ForeignKey(Gauge, models.CASCADE, related_name="readings")
    value = models.IntegerField()

    objects = AsyncManager(cache=60)

    def __str__(self) -> str:
        return f"{self.gauge_id}: {self.value}"
