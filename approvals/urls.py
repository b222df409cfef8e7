from __future__ import annotations

from django.urls import path

from approvals import views

app_name = "approvals"

urlpatterns = [
    path("approvals/", views.approval_inbox, name="approval-inbox"),
    path("approvals/badge/", views.inbox_badge, name="inbox-badge"),
    path("approvals/<int:approval_id>/decide/", views.approval_decide, name="approval-decide"),
    path("approvals/<int:approval_id>/edit/", views.approval_edit, name="approval-edit"),
    path("conflicts/", views.conflict_queue, name="conflict-queue"),
    path("conflicts/<int:conflict_id>/resolve/", views.conflict_resolve, name="conflict-resolve"),
]
