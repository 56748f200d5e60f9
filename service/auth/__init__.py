"""Token -> principal, and what a principal may do; API keys; allowed origins. No sockets."""

from service.auth.api_keys import ApiKeys
from service.auth.origins import origin_allowed
from service.auth.principal import EVERYONE, IdentitySource, Principal
from service.auth.tokens import Authenticator, InvalidToken

__all__ = [
    "EVERYONE",
    "ApiKeys",
    "Authenticator",
    "IdentitySource",
    "InvalidToken",
    "Principal",
    "origin_allowed",
]
