"""How to call an API, as its portal page shows it: where the key or the token goes, who issues tokens, a curl line."""

from __future__ import annotations

from dataclasses import dataclass, field

from apimgmt.models import Api


@dataclass(frozen=True)
class TokenIssuer:
    """One identity provider whose tokens the API takes, in the words a developer needs."""

    name: str
    issuer: str  # the token's iss
    audiences: list[str]  # the token's aud must name one of them (empty: not checked)
    app_claim: str  # the claim that says which app calls
    query_param: str  # "" unless this issuer's tokens may also come in this query parameter


@dataclass(frozen=True)
class HowToCall:
    base_url: str
    key_places: list[str] = field(default_factory=list)  # empty: the API takes no keys
    token_places: list[str] = field(default_factory=list)  # empty: the API takes no tokens
    issuers: list[TokenIssuer] = field(default_factory=list)
    curl: list[str] = field(default_factory=list)

    @property
    def takes_keys(self) -> bool:
        return bool(self.key_places)

    @property
    def takes_tokens(self) -> bool:
        return bool(self.token_places)


def how_to_call(api: Api, base_url: str) -> HowToCall:
    """The API's ways in for its auth method: key (header, bearer, query), JWT (bearer; the query parameter an issuer
    allows is shown with that issuer, whose tokens alone may use it), or both."""
    takes_keys = api.auth_method in (Api.AuthMethod.KEY, Api.AuthMethod.KEY_OR_JWT)
    takes_tokens = api.auth_method in (Api.AuthMethod.JWT, Api.AuthMethod.KEY_OR_JWT)
    key_places: list[str] = []
    if takes_keys:
        key_places.append(f"{api.key_header}: <key>")
        if api.accept_bearer:
            key_places.append("Authorization: Bearer <key>")
        if api.key_query_param:
            key_places.append(f"?{api.key_query_param}=<key>")
    issuers: list[TokenIssuer] = []
    token_places: list[str] = []
    if takes_tokens:
        token_places.append("Authorization: Bearer <token>")
        for issuer in api.jwt_issuers.order_by("name"):
            issuers.append(
                TokenIssuer(
                    name=issuer.name,
                    issuer=issuer.issuer,
                    audiences=[str(a) for a in issuer.audiences or []],
                    app_claim=issuer.consumer_claim,
                    query_param=issuer.token_in_query,
                )
            )
    curl = []
    if takes_keys:
        curl.append(f'curl -H "{api.key_header}: $API_KEY" {base_url}/')
    if takes_tokens:
        curl.append(f'curl -H "Authorization: Bearer $TOKEN" {base_url}/')
    return HowToCall(base_url=base_url, key_places=key_places, token_places=token_places, issuers=issuers, curl=curl)
