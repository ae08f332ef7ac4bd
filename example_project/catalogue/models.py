"""A bookshop catalogue. No indexes beyond the foreign keys: the dashboard's reports
scan, as reporting queries on a busy table often do, so each takes tens of ms."""

from asynchrormous import AsyncManager
from django.db import models


class Genre(models.Model):
    name = models.CharField(max_length=50, unique=True)

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.name


class Publisher(models.Model):
    name = models.CharField(max_length=100, unique=True)
    country = models.CharField(max_length=2)

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.name


class Author(models.Model):
    name = models.CharField(max_length=100)
    born = models.PositiveSmallIntegerField()

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.name


class Book(models.Model):
    title = models.CharField(max_length=200)
    author = models.ForeignKey(Author, models.CASCADE, related_name="books")
    publisher = models.ForeignKey(Publisher, models.CASCADE, related_name="books")
    genre = models.ForeignKey(Genre, models.CASCADE, related_name="books")
    published = models.DateField()
    pages = models.PositiveIntegerField()
    price = models.DecimalField(max_digits=6, decimal_places=2)
    rating = models.FloatField(help_text="Average reader rating, 1 to 5.")
    copies_sold = models.PositiveIntegerField()
    stock = models.PositiveIntegerField()

    objects = AsyncManager()

    def __str__(self) -> str:
        return self.title
