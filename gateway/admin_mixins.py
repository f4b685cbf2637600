"""Admin plumbing: every admin write to something the gateway serves bumps the config version."""

from __future__ import annotations

from django.contrib import admin
from django.db import transaction

from gateway.config import change_scope, config_bump, config_lock, merge_scopes, stored_scope


class ConfigChangeMixin:
    """Saves and deletes run in the admin's transaction, together with a config bump: a key
    delta when the object's scope says which keys it reaches (before and after the change),
    else a rebuild."""

    def save_model(self, request, obj, form, change) -> None:
        # The admin's own transaction is open: the stored row is still the old one.
        request._config_scope = stored_scope(obj) if change else set()
        super().save_model(request, obj, form, change)

    def save_related(self, request, form, formsets, change) -> None:
        # Admin saves the object, then its many-to-many fields and inlines, all in one
        # transaction: the bump comes last so the version records the whole change.
        with transaction.atomic():
            super().save_related(request, form, formsets, change)
            obj = form.instance
            verb = "changed" if change else "added"
            before = getattr(request, "_config_scope", None)
            config_lock()  # before reading the keys the change reaches now
            config_bump(
                actor=request.user,
                reason=f"{obj._meta.verbose_name} {obj} {verb}",
                key_ids=merge_scopes(before, change_scope(obj)),
            )

    def delete_model(self, request, obj) -> None:
        with transaction.atomic():
            label = f"{obj._meta.verbose_name} {obj} deleted"
            config_lock()
            scope = stored_scope(obj)
            super().delete_model(request, obj)
            config_bump(actor=request.user, reason=label, key_ids=scope)

    def delete_queryset(self, request, queryset) -> None:
        with transaction.atomic():
            n = queryset.count()
            config_lock()
            scope = merge_scopes(*(stored_scope(obj) for obj in queryset))
            super().delete_queryset(request, queryset)
            config_bump(
                actor=request.user,
                reason=f"{n} {queryset.model._meta.verbose_name_plural} deleted",
                key_ids=scope,
            )


class ConfigChangeAdmin(ConfigChangeMixin, admin.ModelAdmin):
    pass
