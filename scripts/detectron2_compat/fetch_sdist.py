"""Fetch the pb1-detectron2==0.6 sdist from the package index and verify its sha256.

Usage: python fetch_sdist.py DEST_DIR   (prints the path of the verified archive)

`pip download` cannot fetch this sdist with current pip: it prepares the metadata, and pip >= 25 rejects the
`panopticapi @ https://...` direct-URL dependency that setup.py declares. So this reads the index's PEP 503
"simple" page (the same protocol pip speaks), downloads the archive it links and checks the pinned hash.
Environment: DETECTRON2_SDIST=/path/to/pb1-detectron2-0.6.tar.gz uses a local copy (still hash-checked);
PIP_INDEX_URL (or pip's global.index-url) picks another index; PIP_CERT / SSL_CERT_FILE a CA bundle.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import ssl
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path

PROJECT = "pb1-detectron2"
VERSION = "0.6"
SHA256 = "5d2e9e51e523ec72f6a31cca04b0a515492e9514b773a3d134cedc0677170b29"
FILENAMES = (f"{PROJECT}-{VERSION}.tar.gz", f"{PROJECT.replace('-', '_')}-{VERSION}.tar.gz")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _context() -> ssl.SSLContext:
    cafile = os.environ.get("PIP_CERT") or os.environ.get("SSL_CERT_FILE")
    return ssl.create_default_context(cafile=cafile if cafile and Path(cafile).is_file() else None)


def _open(url: str):
    return urllib.request.urlopen(url, timeout=120, context=_context())


def _index_url() -> str:
    """The index pip would use: $PIP_INDEX_URL, else pip's configured global.index-url, else PyPI."""
    if os.environ.get("PIP_INDEX_URL"):
        return os.environ["PIP_INDEX_URL"]
    configured = subprocess.run(
        [sys.executable, "-m", "pip", "config", "get", "global.index-url"], capture_output=True, text=True
    )
    value = configured.stdout.strip()
    return (
        value if configured.returncode == 0 and value.startswith(("http://", "https://")) else "https://pypi.org/simple"
    )


def find_url(index: str) -> str:
    page_url = f"{index.rstrip('/')}/{PROJECT}/"
    with _open(page_url) as response:
        page = response.read().decode("utf-8", "replace")
    for href in re.findall(r'href="([^"]+)"', page):
        href = href.replace("&amp;", "&")
        name = urllib.parse.unquote(urllib.parse.urlsplit(href).path.rsplit("/", 1)[-1])
        if name in FILENAMES:
            return urllib.parse.urljoin(page_url, href)
    raise SystemExit(f"{page_url}: no link to any of {FILENAMES}")


def fetch(dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / FILENAMES[0]
    local = os.environ.get("DETECTRON2_SDIST")
    if local:
        if not Path(local).is_file():
            raise SystemExit(f"DETECTRON2_SDIST={local}: file not found")
        shutil.copyfile(local, archive)
    else:
        url = find_url(_index_url())
        with _open(url) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out)
    got = _sha256(archive)
    if got != SHA256:
        archive.unlink()
        raise SystemExit(f"{PROJECT}-{VERSION} sdist: sha256 {got} does not match the pinned {SHA256}")
    return archive


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    print(fetch(Path(sys.argv[1])))
