"""Signed, expiring credentials (JWT, EdDSA over Ed25519, with PyJWT).

The issuer holds the private key (``lifl token keygen`` writes it); the server holds only the
public key (``token_key``), so a compromised server cannot mint credentials. Claims:

    sub     the client's identity (a push must carry it as its client id)
    job     the job the credential is for ("*": any job; operators of every job)
    rounds  optional list of round ids a client may push to
    role    "client" (push, pull, read rounds) or "operator" (also open and close rounds)
    jti     token id, for revocation
    iat/exp issue and expiry times; iss is always "lifl"

Verification never echoes a token or a key in its errors: the messages are fixed texts."""
from __future__ import annotations

import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from .errors import LiflError

ISSUER = "lifl"
ROLES = ("client", "operator")
ALGORITHM = "EdDSA"


class CredentialError(LiflError):
    """A refused credential; ``why`` labels the refusal in metrics."""

    def __init__(self, code: str, message: str, why: str):
        super().__init__(code, message)
        self.why = why


@dataclass(frozen=True)
class Claims:
    sub: str
    job: str
    role: str
    jti: str
    exp: float
    rounds: frozenset[int] | None = None


def keygen(private_path: str | Path, public_path: str | Path) -> None:
    """Write a new Ed25519 key pair as PEM; the private key file is created mode 0600."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

    key = Ed25519PrivateKey.generate()
    priv = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())
    pub = key.public_key().public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(priv)
    Path(public_path).write_bytes(pub)


def issue(private_key_pem: bytes, sub: str, job: str, role: str = "client", ttl_s: float = 3600.0,
          rounds: list[int] | None = None, now: float | None = None, jti: str | None = None) -> str:
    """A signed credential (compact JWT). ``now`` defaults to the real time."""
    import jwt

    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}, got {role!r}")
    if not sub or not job:
        raise ValueError("a credential needs a subject (client id) and a job ('*' for any)")
    if ttl_s <= 0:
        raise ValueError("ttl must be > 0 seconds")
    now = time.time() if now is None else now
    claims = {"iss": ISSUER, "sub": sub, "job": job, "role": role, "jti": jti or uuid.uuid4().hex,
              "iat": int(now), "exp": int(now + ttl_s)}
    if rounds:
        claims["rounds"] = sorted({int(r) for r in rounds})
    return jwt.encode(claims, _private_key(private_key_pem), algorithm=ALGORITHM)


def _private_key(pem: bytes):
    from cryptography.hazmat.primitives import serialization
    try:
        return serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError):
        raise ValueError("the signing key file is not an unencrypted PEM private key") from None


def looks_signed(token: str) -> bool:
    """A compact JWT has three dot-separated parts; static tokens are told apart by this."""
    return token.count(".") == 2


class Revocations:
    """Token ids (``jti``) refused although their signature and expiry are good: one per line in
    a text file (``#`` comments). The file is re-read whenever its size or modification time
    changes (checked on each call, one ``stat``); if it becomes unreadable, the last list read
    stays in force and a warning is logged."""

    def __init__(self, path: str, log=None):
        self.path, self.log = path, log
        self._lock = threading.Lock()
        self._stamp: tuple[int, int, int] | None = None
        self._ids: frozenset[str] = frozenset()
        if path:
            self._reload(os.stat(path))   # unreadable at start: the server does not start

    def _reload(self, st) -> None:
        text = Path(self.path).read_text()
        self._ids = frozenset(line.split("#", 1)[0].strip() for line in text.splitlines()) - {""}
        self._stamp = (st.st_mtime_ns, st.st_size, st.st_ino)

    def __contains__(self, jti: str) -> bool:
        if not self.path:
            return False
        with self._lock:
            try:
                st = os.stat(self.path)
                if (st.st_mtime_ns, st.st_size, st.st_ino) != self._stamp:
                    self._reload(st)
            except OSError as e:
                if self.log is not None:
                    self.log.warning("revocation list %s unreadable (%s); keeping the last one read",
                                     self.path, e.strerror)
            return jti in self._ids


class Verifier:
    """Checks a credential's signature, issuer, expiry, claims and revocation."""

    def __init__(self, public_key_pem: bytes, revocations: Revocations | None = None, leeway_s: float = 5.0):
        from cryptography.hazmat.primitives import serialization
        try:
            self._key = serialization.load_pem_public_key(public_key_pem)
        except (ValueError, TypeError):
            raise ValueError("token_key is not a PEM public key") from None
        self.revocations = revocations or Revocations("")
        self.leeway_s = leeway_s

    def verify(self, token: str) -> Claims:
        import jwt

        try:
            c = jwt.decode(token, self._key, algorithms=[ALGORITHM], issuer=ISSUER, leeway=self.leeway_s,
                           options={"require": ["exp", "iat", "sub", "jti", "iss"]})
        except jwt.ExpiredSignatureError:
            raise CredentialError("UNAUTHENTICATED", "the credential has expired; ask for a new one", "expired") from None
        except jwt.InvalidSignatureError:
            raise CredentialError("UNAUTHENTICATED", "the credential's signature does not verify with this "
                                                     "server's key", "invalid") from None
        except jwt.MissingRequiredClaimError as e:
            raise CredentialError("UNAUTHENTICATED", f"the credential has no {e.claim!r} claim", "invalid") from None
        except jwt.ImmatureSignatureError:
            raise CredentialError("UNAUTHENTICATED", "the credential is not valid yet", "invalid") from None
        except jwt.InvalidTokenError:
            raise CredentialError("UNAUTHENTICATED", "the credential is malformed or not issued by lifl",
                                  "invalid") from None
        role, job, rounds = c.get("role"), c.get("job"), c.get("rounds")
        if role not in ROLES or not isinstance(job, str) or not job or not isinstance(c["sub"], str) \
                or not (rounds is None or (isinstance(rounds, list) and all(type(r) is int for r in rounds))):
            raise CredentialError("UNAUTHENTICATED", "the credential's role, job or rounds claim is malformed",
                                  "invalid")
        if str(c["jti"]) in self.revocations:
            raise CredentialError("UNAUTHENTICATED", f"credential {c['jti']} has been revoked", "revoked")
        return Claims(c["sub"], job, role, str(c["jti"]), float(c["exp"]),
                      None if rounds is None else frozenset(rounds))
