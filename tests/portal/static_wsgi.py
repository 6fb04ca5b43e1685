"""The app as gunicorn serves it, plus /static/ served from the apps' static dirs (nginx's job in production)."""

from __future__ import annotations

from django.contrib.staticfiles.handlers import StaticFilesHandler

from apimgmt.wsgi import application as _application

# Everything but /static/ goes to the real application (gateway first, then Django), untouched.
application = StaticFilesHandler(_application)  # type: ignore[arg-type]
