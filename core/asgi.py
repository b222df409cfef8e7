from __future__ import annotations

import os

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings")
django.setup(set_prefix=False)  # as django.core.asgi.get_asgi_application does

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from core.collector import settle_after_startup  # noqa: E402
from core.request_threads import http_application, keep_request_connections  # noqa: E402
from core.routing import websocket_urlpatterns  # noqa: E402

keep_request_connections(settings.RUNWARDEN_WEB_CONN_MAX_AGE)
application = ProtocolTypeRouter(
    {
        "http": http_application(
            settings.RUNWARDEN_WEB_THREADS, prepare=settings.RUNWARDEN_WEB_CONN_MAX_AGE > 0
        ),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
settle_after_startup()
