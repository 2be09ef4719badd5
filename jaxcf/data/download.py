"""Fetching dataset archives into a local cache with pooch, and extracting them safely.

Layout of the cache (``$JAXCF_DATA``, default ``~/.cache/jaxcf``)::

    <name>.zip      the archive, kept once its size and sha256 match
    <name>/         its contents (the archive's single top folder, renamed)

``pooch.retrieve`` downloads (with a timeout and a progress bar), checks the sha256 and renames the
file into place only when it matches, so a ``<name>.zip`` in the cache is always a verified archive;
a mismatch or an interrupted download leaves nothing. Extraction goes through a temporary folder
too, so a ``<name>/`` is always complete, and it refuses members that would land outside the target
folder (absolute paths, ``..``) and symbolic links before writing anything.

The base URL is ``https://files.grouplens.org/datasets/movielens`` unless ``$JAXCF_DATA_URL`` says
otherwise (a mirror, or a local server in the tests). Offline, put the archive at the path the
error message names.

What does not live here: which datasets exist and how they are parsed (``jaxcf.data.registry``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import stat
import sys
import tempfile
import zipfile
from pathlib import Path, PurePosixPath

from jaxcf.core.errors import DataError

DEFAULT_URL = "https://files.grouplens.org/datasets/movielens"
# Seconds without a byte before a download is abandoned.
TIMEOUT = 60
CHUNK = 1 << 20


@dataclasses.dataclass(frozen=True)
class Archive:
    """A downloadable dataset archive.

    Attributes:
      name: the cache name (``<name>.zip``, ``<name>/``); the registry name of the dataset.
      filename: the file name on the server, e.g. ``ml-1m.zip``.
      folder: the single top-level folder inside the zip, e.g. ``ml-10M100K``.
      size: expected bytes, or None when no sourced value exists.
      sha256: expected digest, or None (then only the zip's own CRC-32s protect the contents).
    """

    name: str
    filename: str
    folder: str
    size: int | None
    sha256: str | None


def data_home() -> Path:
    """The cache folder: ``$JAXCF_DATA``, else ``~/.cache/jaxcf``."""
    return Path(os.environ.get("JAXCF_DATA") or Path.home() / ".cache" / "jaxcf").expanduser()


def base_url() -> str:
    """The download base URL: ``$JAXCF_DATA_URL``, else GroupLens."""
    return (os.environ.get("JAXCF_DATA_URL") or DEFAULT_URL).rstrip("/")


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(CHUNK), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(archive: Archive, size: int, sha256: str) -> str | None:
    """What is wrong with an archive of this size and digest, or None."""
    if archive.size is not None and size != archive.size:
        return f"size {size} bytes, expected {archive.size}"
    if archive.sha256 is not None and sha256 != archive.sha256:
        return f"sha256 {sha256}, expected {archive.sha256}"
    return None


def download(archive: Archive, target: Path, *, progress: bool | None = None) -> None:
    """Downloads ``archive`` to ``target`` with pooch, verifying its sha256 (and size).

    Args:
      progress: draw a tqdm bar on stderr; None draws it only on a terminal.

    Raises:
      DataError: network failure (with the manual-placement hint), HTTP error, an interrupted
        download, or a size/sha256 mismatch. Nothing is left at ``target`` or in temporary files.
    """
    import pooch
    import requests

    url = f"{base_url()}/{archive.filename}"
    manual = f"fetch it elsewhere and put it at {target} (it is verified before use), or set JAXCF_DATA_URL to a mirror"
    show = sys.stderr.isatty() if progress is None else progress
    downloader = pooch.HTTPDownloader(progressbar=show, timeout=TIMEOUT)
    known = f"sha256:{archive.sha256}" if archive.sha256 else None
    target.parent.mkdir(parents=True, exist_ok=True)
    # pooch logs "Downloading data from ..." at INFO; the progress bar says as much.
    logger = pooch.get_logger()
    level = logger.level
    logger.setLevel("WARNING")
    try:
        pooch.retrieve(url, known_hash=known, fname=target.name, path=target.parent, downloader=downloader)
    except requests.HTTPError as err:
        code = getattr(err.response, "status_code", "?")
        reason = getattr(err.response, "reason", "")
        raise DataError(f"cannot download {url}: HTTP {code} {reason}; {manual}") from None
    except (requests.ConnectionError, requests.Timeout) as err:
        raise DataError(f"cannot download {url} ({type(err).__name__}); if offline, {manual}") from None
    except requests.RequestException as err:
        raise DataError(f"download of {url} broke off ({type(err).__name__}); run again, or {manual}") from None
    except ValueError:  # pooch: the downloaded file's hash does not match (it deleted the download)
        target.unlink(missing_ok=True)
        raise DataError(
            f"{url}: the download's sha256 does not match the expected {archive.sha256}; the download was deleted; "
            f"{manual}"
        ) from None
    finally:
        logger.setLevel(level)
    problem = _check(archive, target.stat().st_size, archive.sha256 or _sha256(target))
    if problem:
        target.unlink(missing_ok=True)
        raise DataError(f"{url}: {problem}; the download was deleted; {manual}")


def _member_path(info: zipfile.ZipInfo) -> PurePosixPath:
    """The member's relative path, or DataError when it is absolute, escapes, or is a link."""
    name = info.filename.replace("\\", "/")
    path = PurePosixPath(name)
    if name.startswith("/") or (len(name) > 1 and name[1] == ":") or path.is_absolute():
        raise DataError(f"archive member {info.filename!r} has an absolute path; refusing to extract")
    if ".." in path.parts:
        raise DataError(f"archive member {info.filename!r} points outside the archive folder; refusing to extract")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise DataError(f"archive member {info.filename!r} is a symbolic link; refusing to extract")
    return path


def extract(zip_path: Path, archive: Archive, target: Path) -> None:
    """Extracts the archive's top folder to ``target`` through a temporary folder.

    Every member is checked before anything is written. Reading each member checks its CRC-32.

    Raises:
      DataError: not a zip, unsafe members, a CRC error, or the expected folder is missing.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.", suffix=".extract"))
    try:
        try:
            with zipfile.ZipFile(zip_path) as bundle:
                members = [(info, _member_path(info)) for info in bundle.infolist()]
                if not any(path.parts and path.parts[0] == archive.folder for _, path in members):
                    raise DataError(f"{zip_path}: has no {archive.folder}/ folder; is it the right archive?")
                root = staging.resolve()
                for info, path in members:
                    destination = (staging / path).resolve()
                    # Belt and braces: the resolved path must still be inside the staging folder.
                    if root not in destination.parents and destination != root:
                        raise DataError(f"archive member {info.filename!r} resolves outside the target; refusing")
                    if info.is_dir():
                        destination.mkdir(parents=True, exist_ok=True)
                        continue
                    destination.parent.mkdir(parents=True, exist_ok=True)
                    with bundle.open(info) as source, open(destination, "xb") as sink:
                        shutil.copyfileobj(source, sink, CHUNK)
        except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError) as err:
            raise DataError(f"{zip_path}: not a readable zip archive ({err}); delete it and run again") from None
        except FileExistsError as err:
            raise DataError(f"{zip_path}: member {err.filename} appears twice; refusing to extract") from None
        try:
            os.replace(staging / archive.folder, target)
        except OSError:
            # Another process finished the same extraction first; its result is as good as ours.
            if not target.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def fetch(archive: Archive, *, progress: bool | None = None) -> Path:
    """The extracted folder of ``archive``, downloading and extracting it on first use.

    A complete ``<name>/`` in the cache is used as it is (no network). Otherwise a
    ``<name>.zip`` already in the cache (e.g. put there by hand) is verified and extracted; only
    when there is none is it downloaded.

    Raises:
      DataError: see :func:`download` and :func:`extract`.
    """
    home = data_home()
    folder = home / archive.name
    if folder.is_dir():
        return folder
    zip_path = home / f"{archive.name}.zip"
    downloaded = False
    if zip_path.is_file():
        problem = _check(archive, zip_path.stat().st_size, _sha256(zip_path))
        if problem:
            raise DataError(
                f"{zip_path}: {problem}; it is not the official {archive.filename}: delete it (jaxcf then "
                "downloads the archive) or replace it with the official file"
            )
    else:
        download(archive, zip_path, progress=progress)
        downloaded = True
    try:
        extract(zip_path, archive, folder)
    except DataError:
        # An archive that cannot be extracted safely is of no use in the cache: drop what we fetched.
        if downloaded:
            zip_path.unlink(missing_ok=True)
        raise
    return folder
