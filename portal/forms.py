"""Portal forms: they parse and check input; every write is left to apimgmt.services."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from django import forms
from django.contrib.auth.forms import PasswordResetForm, UserCreationForm, UsernameField
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError

from apimgmt.models import Consumer, Plan, Tenant


def add_service_errors(form: forms.Form, exc: ValidationError, *, field_map: dict[str, str] | None = None) -> None:
    """Show a service's ValidationError next to the matching field (or above the form)."""
    mapping = field_map or {}
    if hasattr(exc, "error_dict"):
        for field, errors in exc.message_dict.items():
            target = mapping.get(field, field)
            form.add_error(target if target in form.fields else None, errors)
    else:
        form.add_error(None, exc.messages)


class SignUpForm(UserCreationForm):
    email = forms.EmailField(
        label="E-mail", help_text="We send a link to this address to confirm it is yours.", max_length=254
    )

    class Meta:
        model = User
        fields = ("username", "email")
        field_classes = {"username": UsernameField}

    def __init__(self, *args: Any, invited_email: str | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.invited_email = invited_email
        self.fields["username"].label = "User name"
        self.fields["username"].help_text = "Letters, digits and @ . + - _ only; you sign in with it."
        if invited_email:
            self.fields["email"].initial = invited_email
            self.fields["email"].disabled = True
            self.fields["email"].help_text = "You were invited at this address."

    def clean_email(self) -> str:
        email = self.invited_email or self.cleaned_data["email"]
        email = email.strip().lower()
        # An open sign-up never says whether an address has an account (the view mails the address's owner
        # instead). An invited one may: only whoever reads that mailbox holds the invitation link.
        if self.invited_email and User.objects.filter(email__iexact=email).exists():
            raise ValidationError("An account with this e-mail already exists. Sign in, or reset its password.")
        return email


class LoginForm(forms.Form):
    username = forms.CharField(
        label="User name", max_length=150, widget=forms.TextInput(attrs={"autocomplete": "username", "autofocus": True})
    )
    password = forms.CharField(
        label="Password", strip=False, widget=forms.PasswordInput(attrs={"autocomplete": "current-password"})
    )


class TenantPasswordResetForm(PasswordResetForm):
    """Only members of this portal's tenant get a reset mail; the answer is the same either way."""

    def __init__(self, *args: Any, tenant: Tenant, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.tenant = tenant

    def get_users(self, email: str) -> Iterator[Any]:
        for user in super().get_users(email):
            if user.memberships.filter(tenant=self.tenant).exists():
                yield user


class AppForm(forms.Form):
    name = forms.CharField(
        label="App name", max_length=100, help_text="Unique in this portal, e.g. “billing-service (staging)”."
    )
    description = forms.CharField(label="Description", required=False, widget=forms.Textarea(attrs={"rows": 3}))

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not name:
            raise ValidationError("Give the app a name.")
        return name


class PlanChoiceField(forms.ModelChoiceField):
    """Plans that need an admin's approval say so in the list."""

    def label_from_instance(self, obj: Any) -> str:
        return f"{obj.name} — needs approval" if obj.approval == Plan.Approval.MANUAL else str(obj.name)


class SubscribeForm(forms.Form):
    app = forms.ModelChoiceField(queryset=Consumer.objects.none(), label="App", empty_label=None)
    plan = PlanChoiceField(
        queryset=Plan.objects.none(),
        label="Plan",
        required=False,
        empty_label="Default (no plan)",
        help_text="Plans marked “needs approval” wait for a tenant admin.",
    )

    def __init__(self, *args: Any, apps: Any, plans: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app_field = self.fields["app"]
        plan_field = self.fields["plan"]
        assert isinstance(app_field, forms.ModelChoiceField) and isinstance(plan_field, forms.ModelChoiceField)
        app_field.queryset = apps
        plan_field.queryset = plans


EXPIRY_CHOICES = [("", "Never"), ("30", "In 30 days"), ("90", "In 90 days"), ("365", "In a year")]


class KeyCreateForm(forms.Form):
    name = forms.CharField(
        label="Key name", max_length=100, required=False, help_text="Where you will use it, e.g. “production”."
    )
    expires_in_days = forms.TypedChoiceField(
        label="Expires", choices=EXPIRY_CHOICES, coerce=int, empty_value=None, required=False
    )


OVERLAP_CHOICES = [
    ("0", "Stop the old key now"),
    ("3600", "Keep the old key for 1 hour"),
    ("86400", "Keep the old key for 1 day"),
    ("604800", "Keep the old key for 7 days"),
]


class KeyRotateForm(forms.Form):
    overlap_seconds = forms.TypedChoiceField(
        label="Overlap",
        choices=OVERLAP_CHOICES,
        coerce=int,
        initial="3600",
        widget=forms.RadioSelect,
        help_text="How long the old key keeps working, so you can deploy the new one first.",
    )


class InviteForm(forms.Form):
    email = forms.EmailField(label="E-mail", help_text="We send them a sign-up link valid for 7 days.")
