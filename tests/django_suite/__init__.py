"""Run Django's own test suite against asynchrormous (see run.py)."""
