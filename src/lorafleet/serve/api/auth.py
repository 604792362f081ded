"""API keys, tenants and private adapters (`--auth FILE`, JSON or YAML); keys compared in
constant time."""

from __future__ import annotations

import hashlib
import hmac
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from lorafleet.errors import LorafleetError
from lorafleet.serve.api.limits import Limits

NAME_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")
LIMIT_FIELDS = ("max_concurrent", "tokens_per_minute")  # a tenant's optional limits


def valid_name(name: str) -> bool:
    """An adapter or tenant name: [A-Za-z0-9._-]{1,64}, not starting with a dot (no `..`)."""
    return isinstance(name, str) and bool(NAME_RE.match(name)) and not name.startswith(".")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a tenant (None = anonymous, when auth is off) and whether an admin."""

    tenant: str | None
    admin: bool = False


def _digest(key: str) -> bytes:
    # Equal-length digests so compare_digest's time says nothing about the key's length.
    return hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()


@dataclass
class AuthConfig:
    """`{"admin_keys": [...], "tenants": {NAME: {"keys": [...], "private_adapters": [...],
    "max_concurrent": N, "tokens_per_minute": M}}}`.

    With no config (auth off) every caller may use every adapter and admin routes are closed.
    An adapter no tenant lists as private is public. Admin keys may use every adapter.
    `max_concurrent` / `tokens_per_minute` (optional, integers >= 1) limit the tenant, all its
    keys together (serve/api/limits.py); a tenant without them gets the server's defaults
    (`limits_for`); admin keys are never limited."""

    admin_keys: list[str] = field(default_factory=list)
    tenants: dict[str, dict] = field(default_factory=dict)
    enabled: bool = True

    def __post_init__(self):
        if not isinstance(self.admin_keys, list) or not all(
            isinstance(k, str) and k for k in self.admin_keys
        ):
            raise LorafleetError("auth: admin_keys must be a list of non-empty strings")
        if not isinstance(self.tenants, dict):
            raise LorafleetError("auth: tenants must be an object of tenant name -> settings")
        self._keys: list[tuple[bytes, Principal]] = [
            (_digest(k), Principal(None, admin=True)) for k in self.admin_keys
        ]
        self.owner: dict[str, str] = {}  # private adapter -> its tenant
        self.limits: dict[str, Limits] = {}  # tenant -> its own limits (a field None: default)
        for name, spec in self.tenants.items():
            if not valid_name(name):
                raise LorafleetError(f"auth: bad tenant name {name!r}")
            if not isinstance(spec, dict):
                raise LorafleetError(f"auth: tenant {name}: settings must be an object")
            unknown = set(spec) - {"keys", "private_adapters", *LIMIT_FIELDS}
            if unknown:
                raise LorafleetError(f"auth: tenant {name}: unknown field(s) {sorted(unknown)}")
            keys, private = spec.get("keys", []), spec.get("private_adapters", [])
            if not isinstance(keys, list) or not all(isinstance(k, str) and k for k in keys):
                raise LorafleetError(f"auth: tenant {name}: keys must be non-empty strings")
            if not isinstance(private, list) or not all(valid_name(a) for a in private):
                raise LorafleetError(f"auth: tenant {name}: private_adapters must be names")
            for adapter in private:
                if self.owner.setdefault(adapter, name) != name:
                    raise LorafleetError(
                        f"auth: adapter {adapter} is private to both {self.owner[adapter]} "
                        f"and {name}"
                    )
            self._keys += [(_digest(k), Principal(name)) for k in keys]
            try:
                self.limits[name] = Limits(**{f: spec.get(f) for f in LIMIT_FIELDS})
            except LorafleetError as exc:
                raise LorafleetError(f"auth: tenant {name}: {exc}") from None
        digests = [d for d, _ in self._keys]
        if len(set(digests)) != len(digests):
            raise LorafleetError("auth: the same key is listed twice")

    @classmethod
    def off(cls) -> AuthConfig:
        return cls(enabled=False)

    @classmethod
    def load(cls, path: str | Path) -> AuthConfig:
        """Read a JSON or YAML auth file; one-line LorafleetError on any problem."""
        path = Path(path)
        try:
            text = path.read_text()
        except OSError as exc:
            raise LorafleetError(f"{path}: cannot read the auth file ({exc.strerror})") from None
        try:
            if path.suffix in (".yaml", ".yml"):
                import yaml

                data = yaml.safe_load(text)
            else:
                data = json.loads(text)
        except Exception as exc:
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise LorafleetError(f"{path}: not valid JSON/YAML: {first}") from None
        if not isinstance(data, dict):
            raise LorafleetError(f"{path}: the auth file must hold an object")
        unknown = set(data) - {"admin_keys", "tenants"}
        if unknown:
            raise LorafleetError(f"{path}: unknown field(s) {sorted(unknown)}")
        try:
            return cls(admin_keys=data.get("admin_keys") or [], tenants=data.get("tenants") or {})
        except LorafleetError as exc:
            raise LorafleetError(f"{path}: {exc}") from None

    def identify(self, key: str | None) -> Principal | None:
        """The caller for a bearer key; None for a missing or wrong key (when auth is on)."""
        if not self.enabled:
            return Principal(None)
        if not key:
            return None
        probe, found = _digest(key), None
        for digest, principal in self._keys:  # no early exit: the same work for every key
            if hmac.compare_digest(probe, digest) and found is None:
                found = principal
        return found

    def limits_for(self, tenant: str, default: Limits = Limits()) -> Limits:
        """`tenant`'s limits: its own where set, else `default`'s (the server's)."""
        own = self.limits.get(tenant, Limits())
        return Limits(
            own.max_concurrent if own.max_concurrent is not None else default.max_concurrent,
            own.tokens_per_minute
            if own.tokens_per_minute is not None
            else default.tokens_per_minute,
        )

    def can_use(self, who: Principal, adapter: str) -> bool:
        owner = self.owner.get(adapter)
        return owner is None or who.admin or who.tenant == owner
