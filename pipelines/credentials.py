"""Credentials of a tracking server stay out of the record: mlflow params and tags, saved configs, job folder
names, the report and the terminal.

A `user:password@` in `tracking.uri` (on the command line, or in MLFLOW_TRACKING_URI) is moved into
MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD before Hydra sees the command line, so the config, and every
file Hydra writes from it, holds the URI without them; mlflow's client reads them from the environment, as it
reads MLFLOW_TRACKING_TOKEN, and submitit's jobs inherit the environment. What is written anyway is masked:
any URL's user information, and the value of any key named like a secret (password, token, secret, api key,
credential).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping, Sequence
from urllib.parse import quote, unquote

MASK = "***"
USERNAME, PASSWORD, URI = "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD", "MLFLOW_TRACKING_URI"
SECRET_NAME = re.compile(r"password|passwd|secret|token|api[_-]?key|credential", re.I)
USERINFO = re.compile(r"(?P<scheme>\b[a-z][a-z0-9+.-]*://)(?P<userinfo>[^/@\s'\"]+)@", re.I)
ASSIGNMENT = re.compile(r"(?P<name>[A-Za-z_][\w.-]*)(?P<sep>\s*[=:]\s*)(?P<value>[^\s,;'\"&]+)")


def split_credentials(uri: str) -> tuple[str, str | None, str | None]:
    """(the URI without user information, the user, the password)."""
    match = USERINFO.search(uri)
    if not match:
        return uri, None, None
    user, _, password = match["userinfo"].partition(":")
    clean = uri[: match.start("userinfo")] + uri[match.end() :]
    return clean, unquote(user) or None, unquote(password) or None


def to_environment(overrides: Sequence[str], environ: dict | None = None) -> list[str]:
    """The overrides with the credentials of `tracking.uri` moved into the environment (MLFLOW_TRACKING_URI's
    too); everything else unchanged."""
    environ = os.environ if environ is None else environ
    out = []
    for override in overrides:
        key, sep, value = override.partition("=")
        if sep and key.lstrip("+~") == "tracking.uri":
            override = f"{key}={uri_to_environment(value, environ)}"
        out.append(override)
    if environ.get(URI):
        environ[URI] = uri_to_environment(environ[URI], environ)
    return out


def uri_to_environment(uri: str, environ: dict | None = None) -> str:
    """`uri` without its user information, which goes to MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD."""
    environ = os.environ if environ is None else environ
    clean, user, password = split_credentials(uri)
    if user:
        environ[USERNAME] = user
    if password:
        environ[PASSWORD] = password
    return clean


def mask(text: str) -> str:
    """`text` with every URL's user information and the value of every secret-named assignment masked."""
    text = USERINFO.sub(lambda m: f"{m['scheme']}{MASK}@", text)
    for secret in _known_secrets():
        text = text.replace(secret, MASK)
    return ASSIGNMENT.sub(lambda m: f"{m['name']}{m['sep']}{MASK}" if SECRET_NAME.search(m["name"]) else m[0], text)


def masked(values: Mapping[str, str]) -> dict[str, str]:
    """Flat params or tags with secret-named keys' values and anything secret in the others masked."""
    return {key: MASK if SECRET_NAME.search(key.rsplit(".", 1)[-1]) else mask(str(value))
            for key, value in values.items()}


def _known_secrets() -> list[str]:
    """The secrets this process holds (the password and token mlflow's client reads), in the forms a text may
    hold them: as they are and URL-quoted."""
    found = [os.environ.get(name, "") for name in (PASSWORD, "MLFLOW_TRACKING_TOKEN")]
    return sorted({form for s in found if len(s) >= 4 for form in (s, quote(s, safe=""))}, key=len, reverse=True)
