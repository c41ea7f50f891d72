"""Who may call the API: admins and factories, their API keys, and the caller of a request.

An API key is `dca_<key id>_<secret>`: 32 random bytes of secret, shown once, stored only as its
SHA-256 (the secret is random and long, so a fast hash is enough; no guessing is feasible), compared in
constant time.
"""

import asyncio
import hashlib
import hmac
import re
import secrets
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import datetime, timedelta

from ..errors import BackendUnavailable, CaError, Conflict, Forbidden, NotFound, Unauthorized
from ..ledger import Ledger
from ..ledger.models import ADMIN, FACTORY, INTERMEDIATE, ApiKey, Principal
from ..pki import PkiError, check_ca_id

KEY_PREFIX = "dca"
_KEY = re.compile(r"dca_([0-9a-f]{16})_([A-Za-z0-9_-]{43})")
_NEVER_MATCHES = hashlib.sha256(b"no such key").hexdigest()


@dataclass(frozen=True)
class Caller:
    """The authenticated caller of one request."""

    id: str  # recorded as `requested_by`
    role: str
    intermediates: tuple[str, ...] | None  # the intermediates a factory may use; None: any (admin)
    via: str  # "api-key", "easyauth" or "cli"

    @property
    def is_admin(self) -> bool:
        return self.role == ADMIN


@dataclass(frozen=True)
class NewApiKey:
    """A freshly made key: the only time its secret exists outside the caller's hands."""

    principal: Principal
    key: ApiKey
    secret: str  # the whole key to present, dca_<id>_<secret>


def new_api_key(principal_id: str, now: datetime) -> tuple[ApiKey, str]:
    key_id = secrets.token_hex(8)
    secret = secrets.token_urlsafe(32)
    record = ApiKey(id=key_id, principal_id=principal_id, secret_sha256=_sha256(secret), created_at=now)
    return record, f"{KEY_PREFIX}_{key_id}_{secret}"


def split_api_key(presented: str) -> tuple[str, str] | None:
    match = _KEY.fullmatch(presented.strip())
    return (match.group(1), match.group(2)) if match else None


def hide_api_key_secrets(text: str) -> str:
    """`text` with the secret of every API key in it replaced by "<secret>" (its key ID kept, which names
    the key without granting anything): for error messages, which end up in logs and terminals."""
    return _KEY.sub(lambda match: f"{KEY_PREFIX}_{match.group(1)}_<secret>", text)


_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")


def application_id(app_id: str) -> str:
    """`app_id` as stored: an Entra application (client) ID is a GUID, kept in lowercase (as
    `factory_for_app` looks it up). CaError "invalid-app-id" when it is not a GUID."""
    normalised = app_id.strip().lower()
    if not _GUID.fullmatch(normalised):
        raise CaError(
            "the application ID must be an Entra application (client) ID: a GUID such as "
            "6f2a3c1e-0000-4000-8000-00000000a11c",
            "invalid-app-id",
        )
    return normalised


def _sha256(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


class Principals:
    """The use cases around principals and keys; part of the service layer."""

    def __init__(self, ledger: Ledger, clock: Callable[[], datetime], creation_seconds: float = 60.0) -> None:
        """`creation_seconds`: how long after a factory's principal is written its creation may still be
        writing its key (after that, a keyless factory is the half of a creation that failed)."""
        self.ledger = ledger
        self._now = clock
        self._creation = timedelta(seconds=creation_seconds)

    def create_factory(self, name: str, intermediates: Sequence[str], app_id: str | None = None) -> NewApiKey:
        check_principal_name(name)
        principal = Principal(
            id=name,
            role=FACTORY,
            intermediates=self._known_intermediates(intermediates),
            created_at=self._now(),
            app_id=application_id(app_id) if app_id is not None else None,
        )
        try:
            self.ledger.add_principal(principal)
        except Conflict as taken:
            if taken.code != "principal-exists":
                raise
            principal = self._left_keyless(principal, taken)
        return self._issue_key(principal)

    def _left_keyless(self, principal: Principal, taken: Conflict) -> Principal:
        """The factory of `principal`'s name when it is this same factory with no API key, left by an earlier
        attempt of this very creation that failed between its two writes: its retry gives it its key. While
        the factory is younger than a creation may take, another request may still be writing its key:
        BackendUnavailable (503, try again), so that two creations at once never both get a key. Any other
        factory of that name: `taken` (409 principal-exists)."""
        held = self.ledger.get_principal(principal.id)
        if (
            held is None
            or replace(held, created_at=principal.created_at) != principal
            or any(key.principal_id == principal.id for key in self.ledger.list_api_keys())
        ):
            raise taken
        if held.created_at > self._now() - self._creation:
            raise BackendUnavailable(
                f"factory {principal.id!r} is being created by another request; try again",
                "principal-being-created",
                retry_after=max(1, int(self._creation.total_seconds())),
            )
        return held

    def bind_factory(self, name: str, intermediates: Sequence[str]) -> Principal:
        """Replace the intermediates a factory may sign with (say, when one is rotated out); its API keys,
        its application ID and the certificates it was issued stay as they are."""
        if self.principal(name).role != FACTORY:
            raise CaError(f"{name!r} is an admin, not a factory; admins may use every intermediate", "not-a-factory")
        return self.ledger.set_principal_intermediates(name, self._known_intermediates(intermediates))

    def factories(self) -> list[Principal]:
        return [principal for principal in self.ledger.list_principals() if principal.role == FACTORY]

    def _known_intermediates(self, intermediates: Sequence[str]) -> tuple[str, ...]:
        if not intermediates:
            raise CaError("a factory must be bound to at least one intermediate", "no-intermediates")
        for ca_id in intermediates:
            record = self.ledger.get_ca(ca_id)
            if record is None or record.kind != INTERMEDIATE:
                raise NotFound(f"no intermediate with ID {ca_id!r}", "intermediate-not-found")
        return tuple(dict.fromkeys(intermediates))

    def create_admin_key(self, name: str = "admin") -> NewApiKey:
        check_principal_name(name)
        principal = self.ledger.get_principal(name)
        if principal is None:
            principal = Principal(id=name, role=ADMIN, intermediates=(), created_at=self._now())
            self.ledger.add_principal(principal)
        elif principal.role != ADMIN:
            raise CaError(f"{name!r} is a {principal.role}, not an admin", "not-an-admin")
        return self._issue_key(principal)

    def create_api_key(self, principal_id: str) -> NewApiKey:
        """Another key for an existing principal (to rotate keys without downtime)."""
        return self._issue_key(self.principal(principal_id))

    def revoke_api_key(self, key_id: str) -> ApiKey:
        return self.ledger.revoke_api_key(key_id, self._now())

    def api_keys(self) -> list[ApiKey]:
        return self.ledger.list_api_keys()

    def principal(self, principal_id: str) -> Principal:
        principal = self.ledger.get_principal(principal_id)
        if principal is None:
            raise NotFound(f"no principal called {principal_id!r}", "principal-not-found")
        return principal

    def authenticate(self, presented: str) -> Caller:
        """The caller an API key belongs to; Unauthorized for a malformed, unknown or revoked key."""
        parts = split_api_key(presented)
        found = self.ledger.api_key_with_principal(parts[0]) if parts else None
        stored = found[0].secret_sha256 if found else _NEVER_MATCHES
        matches = hmac.compare_digest(stored, _sha256(parts[1] if parts else ""))
        if not (found and matches):
            raise Unauthorized("the API key is not valid", "invalid-api-key")
        key, principal = found
        if key.revoked_at is not None:
            raise Unauthorized("the API key has been revoked", "revoked-api-key")
        return self._caller(principal, via="api-key")

    async def authenticate_async(self, presented: str) -> Caller:
        """`authenticate` for an event loop: inline on a local ledger (a few microseconds), else in a thread."""
        if self.ledger.remote:
            return await asyncio.to_thread(self.authenticate, presented)
        return self.authenticate(presented)

    def factory_for_app(self, app_id: str) -> Caller:
        principal = self.ledger.principal_for_app(app_id.strip().lower())
        if principal is None or principal.role != FACTORY:
            raise Forbidden(f"no factory is bound to application ID {app_id}", "unknown-application")
        return self._caller(principal, via="easyauth")

    def _issue_key(self, principal: Principal) -> NewApiKey:
        key, secret = new_api_key(principal.id, self._now())
        self.ledger.add_api_key(key)
        return NewApiKey(principal, key, secret)

    @staticmethod
    def _caller(principal: Principal, via: str) -> Caller:
        intermediates = None if principal.role == ADMIN else principal.intermediates
        return Caller(principal.id, principal.role, intermediates, via)


def check_principal_name(name: str) -> None:
    """Principal names follow CA IDs' rule (they appear in the same URLs and tables): PkiError
    "invalid-principal-name" when `name` breaks it."""
    try:
        check_ca_id(name)
    except PkiError as error:
        message = error.message.replace(f"CA ID {name!r}", f"principal name {name!r}", 1)
        raise PkiError("invalid-principal-name", message) from None
