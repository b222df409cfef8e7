from __future__ import annotations

from django.urls import path

from runs import views

app_name = "runs"

urlpatterns = [
    path("runs/", views.run_list, name="run-list"),
    path("runs/<str:run_id>/", views.run_detail, name="run-detail"),
    path("runs/<str:run_id>/cancel/", views.run_cancel, name="run-cancel"),
    path("runs/<str:run_id>/retry/", views.run_retry, name="run-retry"),
    path("runs/<str:run_id>/replay/", views.run_replay, name="run-replay"),
    path("sessions/<slug:tenant>/", views.session_detail, name="session-detail"),
    path("leases/", views.lease_board, name="lease-board"),
]
