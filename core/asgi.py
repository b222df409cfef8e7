from __future__ import annotations

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "core.settings")
django_asgi_app = get_asgi_application()

from channels.auth import AuthMiddlewareStack  # noqa: E402
from channels.routing import ProtocolTypeRouter, URLRouter  # noqa: E402
from channels.security.websocket import AllowedHostsOriginValidator  # noqa: E402
from django.conf import settings  # noqa: E402

from core.request_threads import RequestThreads, keep_request_connections  # noqa: E402
from core.routing import websocket_urlpatterns  # noqa: E402

keep_request_connections(settings.RUNWARDEN_WEB_CONN_MAX_AGE)
application = ProtocolTypeRouter(
    {
        "http": RequestThreads(django_asgi_app, settings.RUNWARDEN_WEB_THREADS),
        "websocket": AllowedHostsOriginValidator(AuthMiddlewareStack(URLRouter(websocket_urlpatterns))),
    }
)
