from django.apps import AppConfig


class PortalConfig(AppConfig):
    name = "portal"
    verbose_name = "Portal: consumers, plans and keys"

    def ready(self) -> None:
        from django.db.models.signals import post_delete

        from portal.models import ApiKey

        post_delete.connect(_key_deleted, sender=ApiKey, dispatch_uid="portal.key_deleted")
        from portal.scopes import register

        register()  # admin and REST edits of keys, users, consumers...: key deltas


def _key_deleted(sender, instance, **kwargs) -> None:
    """However a key disappears (a cascade from its user, organization, subscription or
    plan, a bulk delete), the gateways must drop it: bump the config in that transaction."""
    from django.db import transaction

    from gateway.config import config_bump

    with transaction.atomic():
        config_bump(reason=f"key {instance.prefix} deleted", key_ids=[instance.key_id])
