"""The Hugging Face Hub, through huggingface_hub (which honours HF_ENDPOINT and HF_HUB_OFFLINE)."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from slim.runtime.files import file_sha256, sha256_digest

CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer.model", "*.jinja"]


class HubError(RuntimeError):
    """The hub could not supply what was asked."""


def download_checkpoint(repo_id: str) -> Path:
    """Download (or reuse from the huggingface_hub cache) the files a conversion reads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    try:
        snapshot = Path(snapshot_download(repo_id, allow_patterns=CHECKPOINT_FILES))
    except RepositoryNotFoundError:
        raise HubError(f"hub repo {repo_id} was not found (or is private: run `hf auth login`)") from None
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError) as exc:
        detail = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise HubError(
            f"could not download {repo_id} from the hub ({detail}); "
            "check the connection or HF_ENDPOINT, or pass a local folder"
        ) from None
    _check_blobs(repo_id, snapshot)
    return snapshot


def _check_blobs(repo_id: str, snapshot: Path) -> None:
    """huggingface_hub names each large file's blob by its sha256 (the hub's ETag) but never hashes what it
    downloaded: check the weights against it, and remove a damaged blob so that the next run fetches it again."""
    for path in sorted(snapshot.rglob("*.safetensors")):
        blob = path.resolve()
        if _SHA256.match(blob.name) and file_sha256(blob) != blob.name:
            blob.unlink()
            raise HubError(
                f"{path.name} from {repo_id} does not match its sha256 (a damaged download or cache); "
                "it was removed: run the command again"
            )


# --- slim pull: listing a repo, choosing a GGUF, and a download that resumes across runs ---------------------

_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_SHARD = re.compile(r"-\d{5}-of-(\d{5})\.gguf$")
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_RESUMES_IN_RUN = 3  # reconnects within one run, each only after the previous attempt made progress


class HubInputError(HubError):
    """The hub answered, but what was asked does not exist or is ambiguous: fix the command line."""


def endpoint() -> str:
    from huggingface_hub import constants

    return constants.ENDPOINT


def is_repo_id(text: str) -> bool:
    """Whether `text` is written as a hub repo id (owner/name) rather than a file path; a name
    ending in .gguf is a file. Callers that also take local paths look for the path first."""
    return bool(_REPO_ID.match(text)) and not text.lower().endswith(".gguf")


@dataclass(frozen=True)
class RepoListing:
    repo_id: str
    sha: str  # the commit the listing belongs to; files are then fetched at this commit
    files: tuple[str, ...]

    @property
    def ggufs(self) -> list[str]:
        """The model GGUFs (vision projectors, mmproj-*, left out)."""
        return [f for f in self.files if f.lower().endswith(".gguf") and "mmproj" not in f.rsplit("/", 1)[-1].lower()]

    @property
    def has_checkpoint(self) -> bool:
        return "config.json" in self.files and any(f.endswith(".safetensors") for f in self.files)


@dataclass(frozen=True)
class RemoteFile:
    repo_id: str
    filename: str
    url: str  # where the bytes are (after the hub's redirect, e.g. to its CDN)
    size: int | None
    etag: str

    @property
    def sha256(self) -> str | None:
        """The hub's ETag of an LFS/Xet file is the sha256 of its content."""
        return self.etag if _SHA256.match(self.etag) else None


@contextmanager
def _hub_errors(repo_id: str, what: str) -> Iterator[None]:
    """huggingface_hub's and httpx's exceptions as one HubError line each."""
    import httpx2
    from huggingface_hub.errors import (
        EntryNotFoundError,
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        OfflineModeIsEnabled,
        RemoteEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except GatedRepoError:
        raise HubInputError(
            f"hub repo {repo_id} is gated: accept its terms on the hub, then run `hf auth login`"
        ) from None
    except RepositoryNotFoundError:
        raise HubInputError(f"hub repo {repo_id} was not found (or is private: run `hf auth login`)") from None
    except (RevisionNotFoundError, RemoteEntryNotFoundError, EntryNotFoundError):
        raise HubError(f"{what} is not on the hub (any more); try again") from None
    except HFValidationError:
        raise HubInputError(f"{repo_id!r} is not a valid hub repo id; use owner/name") from None
    except OfflineModeIsEnabled:
        raise HubError(f"cannot {what}: HF_HUB_OFFLINE is set") from None
    except HfHubHTTPError as exc:
        status = exc.response.status_code if exc.response is not None else "an error"
        raise HubError(f"cannot {what}: the hub at {endpoint()} answered {status}; try again later") from None
    except httpx2.TransportError as exc:
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else exc.__class__.__name__
        raise HubError(
            f"could not reach the Hugging Face Hub at {endpoint()} ({reason}); check the connection or HF_ENDPOINT"
        ) from None


def list_repo(repo_id: str) -> RepoListing:
    """The files of a model repo at its current commit (one API call)."""
    from huggingface_hub import HfApi

    with _hub_errors(repo_id, f"list hub repo {repo_id}"):
        info = HfApi().model_info(repo_id)
    return RepoListing(repo_id, info.sha or "main", tuple(s.rfilename for s in info.siblings or ()))


def pick_gguf(listing: RepoListing, qtype: str | None) -> str:
    """The one GGUF to pull: the file naming `qtype` (case-insensitive, as a whole word, so F16 does
    not pick BF16), or the only GGUF when no type is given. Anything else is a HubInputError that
    lists the choices."""
    ggufs = listing.ggufs
    available = ", ".join(ggufs)
    candidates = ggufs
    if qtype:
        word = re.escape(qtype.lower())
        candidates = [f for f in ggufs if re.search(rf"(?<![a-z0-9]){word}(?![a-z0-9])", f.lower())]
        exact = [f for f in candidates if re.search(rf"(?<![a-z0-9]){word}(?![a-z0-9_])", f.lower())]
        candidates = exact or candidates
        if not candidates:
            raise HubInputError(f"no GGUF in {listing.repo_id} matches --type {qtype}; available: {available}")
    first_shard = _SHARD.search(candidates[0]) if candidates else None
    if first_shard and all(_SHARD.search(f) for f in candidates):
        raise HubInputError(
            f"{candidates[0]} is split into {int(first_shard.group(1))} parts; "
            "slim pulls single-file GGUFs only (merge them with llama-gguf-split --merge)"
        )
    if len(candidates) > 1:
        hint = "name one with --type" if not qtype else "give a more specific --type"
        raise HubInputError(
            f"{listing.repo_id} has several GGUFs{' matching ' + qtype if qtype else ''}; "
            f"{hint}: {', '.join(candidates)}"
        )
    return candidates[0]


def remote_file(repo_id: str, filename: str, revision: str | None = None) -> RemoteFile:
    """Size, ETag and download URL of one file (a HEAD request that follows the hub's redirect)."""
    from huggingface_hub import get_hf_file_metadata, hf_hub_url

    with _hub_errors(repo_id, f"find {filename} in {repo_id}"):
        meta = get_hf_file_metadata(hf_hub_url(repo_id, filename, revision=revision))
    if not meta.etag:
        raise HubError(f"the hub at {endpoint()} gave no ETag for {filename}; check HF_ENDPOINT")
    return RemoteFile(repo_id, filename, meta.location, meta.size, meta.etag)


def download(
    remote: RemoteFile,
    dest: Path,
    *,
    on_start: Callable[[int | None, int], None] | None = None,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Download `remote` into `dest`, continuing from what `dest` already holds (HTTP Range).

    An interrupted download leaves `dest` behind, so the next call resumes it; a dropped connection
    is also resumed within the run, a few times, while it makes progress. The result is checked
    against the size and, when the ETag is a sha256, the content hash (a mismatch deletes `dest`).
    """
    import httpx2
    from huggingface_hub import get_session, hf_raise_for_status
    from huggingface_hub.utils import build_hf_headers

    dest.parent.mkdir(parents=True, exist_ok=True)
    have = dest.stat().st_size if dest.exists() else 0
    if remote.size is not None and have > remote.size:
        dest.unlink()
        have = 0
    digest = sha256_digest(dest) if have else hashlib.sha256()  # the hash continues over the resumed part
    if on_start:
        on_start(remote.size, have)

    headers = {"Accept-Encoding": "identity"}
    if urlsplit(remote.url).netloc == urlsplit(endpoint()).netloc:
        headers.update(build_hf_headers())  # the token goes to the hub only, never to a CDN
    failure: Exception | None = None
    with open(dest, "ab") as out:
        for _ in range(1 + _RESUMES_IN_RUN):
            if remote.size is not None and have >= remote.size:
                break
            received = 0
            try:
                wanted = {**headers, "Range": f"bytes={have}-"} if have else headers
                with get_session().stream("GET", remote.url, headers=wanted, follow_redirects=True) as response:
                    with _hub_errors(remote.repo_id, f"download {remote.filename}"):
                        hf_raise_for_status(response)  # an HTTP error ends the run: no retry
                    if have and response.status_code == 200:  # the server ignored Range: start over
                        out.truncate(0)
                        digest, have = hashlib.sha256(), 0
                        if on_start:
                            on_start(remote.size, 0)
                    elif response.status_code == 206:
                        _check_content_range(remote, dest, response.headers.get("Content-Range"), have)
                    for chunk in response.iter_bytes():  # as it arrives: a drop loses nothing received
                        out.write(chunk)
                        digest.update(chunk)
                        have += len(chunk)
                        received += len(chunk)
                        if progress:
                            progress(len(chunk))
                failure = None
                if remote.size is None:
                    break
            except httpx2.TransportError as exc:  # connection refused, dropped or timed out
                failure = exc
                if received == 0:
                    break
    if failure is not None or (remote.size is not None and have != remote.size):
        total = f" of {remote.size / 1e6:.1f}" if remote.size is not None else ""
        if isinstance(failure, (httpx2.RemoteProtocolError, httpx2.ReadError)):
            reason = "the connection dropped"
        elif isinstance(failure, httpx2.TimeoutException):
            reason = "the connection timed out"
        else:
            reason = str(failure).strip().splitlines()[0] if failure is not None else "the server sent too little"
        raise HubError(
            f"download of {remote.filename} stopped at {have / 1e6:.1f}{total} MB ({reason}); "
            "run the same command again to resume it"
        )
    if remote.sha256 and digest.hexdigest() != remote.sha256:
        dest.unlink()
        raise HubError(
            f"{remote.filename} from {remote.repo_id} does not match its sha256; "
            "the download was discarded, run the command again"
        )


_CONTENT_RANGE = re.compile(r"^bytes (\d+)-(\d+)/(\d+|\*)$")


def _check_content_range(remote: RemoteFile, dest: Path, header: str | None, have: int) -> None:
    """A resumed part must start where the file on disk ends, and belong to a file of the expected size:
    otherwise appending it would splice two different files together."""
    match = _CONTENT_RANGE.match(header or "")
    total = match and match.group(3)
    if not match or int(match.group(1)) != have or (remote.size is not None and total not in ("*", str(remote.size))):
        dest.unlink(missing_ok=True)
        raise HubError(
            f"the server resumed {remote.filename} with Content-Range {header!r} where bytes {have}- were asked; "
            "the partial download was discarded, run the command again"
        )
