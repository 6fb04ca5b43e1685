"""Portal forms: they parse and check input; every write is left to apimgmt.services."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from django import forms
from django.contrib.auth.forms import PasswordResetForm, UserCreationForm, UsernameField
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError

from apimgmt.models import DEFAULT_ROTATION_OVERLAP_SECONDS, Consumer, Plan, Tenant
from portal.models import Notice
from portal.plans import PlanCard

# The services speak to staff ("consumer", "tenant"); developers know apps and a portal.
_DEVELOPER_WORDS = [
    (re.compile(r"\bThis owner already has\b"), "You already have"),
    (re.compile(r"\bthis consumer's tenant\b"), "this portal"),
    (re.compile(r"\ba tenant admin\b", re.IGNORECASE), "an administrator"),
    (re.compile(r"\btenant admins?\b", re.IGNORECASE), "administrators"),
    (re.compile(r"\bconsumers\b"), "apps"),
    (re.compile(r"\bconsumer\b"), "app"),
    (re.compile(r"\bConsumer\b"), "App"),
    (re.compile(r"\b(?:this|the|a) tenant\b"), "this portal"),
    (re.compile(r"\btenant\b"), "portal"),
]


def for_developers(message: str) -> str:
    """A service's message in the portal's words: "app" for consumer, "portal" for tenant."""
    for pattern, words in _DEVELOPER_WORDS:
        message = pattern.sub(words, message)
    return message


def add_service_errors(form: forms.Form, exc: ValidationError, *, field_map: dict[str, str] | None = None) -> None:
    """Show a service's ValidationError next to the matching field (or above the form), in developers' words."""
    mapping = field_map or {}
    if hasattr(exc, "error_dict"):
        for field, errors in exc.message_dict.items():
            target = mapping.get(field, field)
            form.add_error(target if target in form.fields else None, [for_developers(e) for e in errors])
    else:
        form.add_error(None, [for_developers(e) for e in exc.messages])


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
        label="App name", max_length=100, help_text="Unique among your apps, e.g. “billing-service (staging)”."
    )
    description = forms.CharField(label="Description", required=False, widget=forms.Textarea(attrs={"rows": 3}))

    def clean_name(self) -> str:
        name = self.cleaned_data["name"].strip()
        if not name:
            raise ValidationError("Give the app a name.")
        return name


class PlanChoiceField(forms.ModelChoiceField):
    """One radio button per plan the API offers: its name, its limits in words, and whether it needs approval."""

    def __init__(self, *args: Any, cards: list[PlanCard], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cards = {card.plan.pk: card for card in cards}

    def label_from_instance(self, obj: Any) -> str:
        card = self.cards.get(obj.pk)
        if card is None:
            return str(obj.name)
        return f"{obj.name}: {card.limits}" + (" (needs approval)" if card.needs_approval else "")


class SubscribeForm(forms.Form):
    """Subscribe one of the developer's apps not yet subscribed; on one of the API's plans when it offers any.

    Nothing is preselected: choosing a plan is the developer's decision, and "no plan" is not on offer when the
    API has plans (the service refuses it too).
    """

    app = forms.ModelChoiceField(queryset=Consumer.objects.none(), label="App", empty_label=None)

    def __init__(self, *args: Any, apps: Any, cards: list[PlanCard], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app_field = self.fields["app"]
        assert isinstance(app_field, forms.ModelChoiceField)
        app_field.queryset = apps
        if cards:
            self.fields["plan"] = PlanChoiceField(
                queryset=Plan.objects.filter(pk__in=[card.plan.pk for card in cards]).order_by("name"),
                cards=cards,
                label="Plan",
                empty_label=None,
                widget=forms.RadioSelect,
                error_messages={"required": "Choose a plan: this API is offered only on the plans above."},
            )

    @property
    def plan_required(self) -> bool:
        return "plan" in self.fields


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
        initial=str(DEFAULT_ROTATION_OVERLAP_SECONDS),
        widget=forms.RadioSelect,
        help_text="How long the old key keeps working, so you can deploy the new one first.",
    )


class InviteForm(forms.Form):
    email = forms.EmailField(label="E-mail", help_text="We send them a sign-up link valid for 7 days.")


class NotificationsForm(forms.Form):
    """The notice mails a developer wants from one portal; unticked ones are switched off."""

    enabled = forms.MultipleChoiceField(
        label="E-mail me when",
        required=False,
        widget=forms.CheckboxSelectMultiple,
        choices=Notice.choices,
    )


class PlanChangeForm(forms.Form):
    """Move a subscription to another plan its API offers (the current one and archived ones are not on offer)."""

    def __init__(self, *args: Any, cards: list[PlanCard], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.fields["plan"] = PlanChoiceField(
            queryset=Plan.objects.filter(pk__in=[card.plan.pk for card in cards]).order_by("name"),
            cards=cards,
            label="New plan",
            empty_label=None,
            widget=forms.RadioSelect,
            error_messages={"required": "Choose the plan to move to."},
        )
