from __future__ import annotations

from django import forms
from django.utils import timezone

from portal.models import Subscription


class KeyCreateForm(forms.Form):
    name = forms.CharField(max_length=100, initial="default")
    subscription = forms.ModelChoiceField(queryset=Subscription.objects.none(), empty_label=None)
    expires_at = forms.DateTimeField(
        required=False,
        widget=forms.DateTimeInput(attrs={"type": "datetime-local"}),
        help_text="Optional. UTC.",
    )

    def __init__(self, *args, subscriptions, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fields["subscription"].queryset = subscriptions
        self.fields["subscription"].label_from_instance = lambda s: s.plan.name

    def clean_expires_at(self):
        value = self.cleaned_data.get("expires_at")
        if value is not None and value <= timezone.now():
            raise forms.ValidationError("The expiry must be in the future.")
        return value
