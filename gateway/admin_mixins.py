"""Admin plumbing: every admin write to something the gateway serves bumps the config version."""

from __future__ import annotations

from django.contrib import admin
from django.db import transaction

from gateway.config import config_bump


class ConfigChangeMixin:
    """Saves and deletes run in the admin's transaction, together with a config bump."""

    def save_related(self, request, form, formsets, change) -> None:
        # Admin saves the object, then its many-to-many fields and inlines, all in one
        # transaction: the bump comes last so the version records the whole change.
        with transaction.atomic():
            super().save_related(request, form, formsets, change)
            obj = form.instance
            verb = "changed" if change else "added"
            config_bump(actor=request.user, reason=f"{obj._meta.verbose_name} {obj} {verb}")

    def delete_model(self, request, obj) -> None:
        with transaction.atomic():
            label = f"{obj._meta.verbose_name} {obj} deleted"
            super().delete_model(request, obj)
            config_bump(actor=request.user, reason=label)

    def delete_queryset(self, request, queryset) -> None:
        with transaction.atomic():
            n = queryset.count()
            super().delete_queryset(request, queryset)
            config_bump(
                actor=request.user,
                reason=f"{n} {queryset.model._meta.verbose_name_plural} deleted",
            )


class ConfigChangeAdmin(ConfigChangeMixin, admin.ModelAdmin):
    pass
