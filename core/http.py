from __future__ import annotations

from django.http import HttpRequest
from django_htmx.middleware import HtmxDetails

from core.models import User


class HtmxHttpRequest(HttpRequest):
    htmx: HtmxDetails


def authenticated_user(request: HttpRequest) -> User:
    """The request's user, for views already behind ``login_required``."""
    user = request.user
    assert isinstance(user, User)
    return user
