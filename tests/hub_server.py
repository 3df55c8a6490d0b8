"""A small Hugging Face Hub look-alike for tests: push with ``HfApi``, pull through olah.

The real Hub cannot be reached from the test machines, so this module speaks the
part of the Hub HTTP protocol that ``huggingface_hub`` 2.4 uses to create a
model repo, upload to it and read it back.  It listens on loopback only and is
meant to run inside the test process (see ``tests/hub_fixtures.py``).

Storage
    Every repo is a plain git repository at ``<root>/models/<namespace>/<name>``
    with its history on branch ``main`` -- the layout olah's ``mirrors-path``
    reads.  Large files are stored the way git-lfs stores them: the commit holds
    a pointer file and the bytes live in ``.git/lfs/objects/<aa>/<bb>/<sha256>``.
    olah's git mirror reader understands exactly this layout (the fixtures
    still run olah as a proxy of this server; ``hub_fixtures.py`` says why).

Implemented
    * ``POST /api/repos/create`` (409 with the repo ``url`` when it exists, as
      the client's ``exist_ok`` handling expects), ``DELETE /api/repos/delete``
      and ``POST /api/models/{repo}/branch/{branch}``.
    * ``GET|HEAD /api/models/{repo}`` and ``.../revision/{rev}`` (repo info),
      ``GET .../tree/{rev}[/{path}]``, ``POST .../paths-info/{rev}``,
      ``GET .../refs``.
    * ``POST .../preupload/{rev}``: LFS for paths the repo's ``.gitattributes``
      tracks with ``filter=lfs``, for files of 10 MiB or more and for binary
      samples; regular otherwise.
    * The git-lfs batch API ``POST /{repo}.git/info/lfs/objects/batch`` with the
      ``basic`` transfer only.  Upload actions point at one-time
      ``PUT /lfs-upload/{ticket}`` URLs on this server (the Hub hands out
      pre-signed storage URLs, which carry no Authorization header either).  An
      upload is hashed while it streams in and only becomes an LFS object when
      its sha256 and size match what the batch call announced; a short or wrong
      body leaves nothing behind.  ``.../objects/verify`` confirms an upload.
    * ``POST .../commit/{rev}`` with the NDJSON body the client sends
      (``header``, ``file``, ``lfsFile``, ``deletedFile``, ``deletedFolder``).
      The new tree is built in a throw-away git index and the branch is moved
      with a compare-and-swap ``git update-ref`` only after every operation
      succeeded, so a failed commit never leaves a partial one behind.
    * ``GET|HEAD /{repo}/resolve/{rev}/{path}`` with ``X-Repo-Commit``,
      ``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` for LFS files, and single
      byte ranges (olah fetches files in ranges).
    * ``GET /api/whoami-v2`` and ``POST /api/validate-yaml``.
    * Hub-style errors: JSON ``{"error": ...}`` plus the ``X-Error-Code`` /
      ``X-Error-Message`` headers ``huggingface_hub`` maps to its exceptions
      (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``).

Deliberately left out
    * Xet storage.  ``huggingface_hub`` 2.4 picks Xet on the client side
      whenever ``hf_xet`` is installed -- nothing a server answers changes that
      -- so clients must run with ``HF_HUB_DISABLE_XET=1``.  The Xet token
      routes answer 501 with a message saying so; no response ever carries Xet
      headers, so downloads use plain HTTP.
    * Private/gated repos (every repo is public; reads need no token),
      datasets and spaces, pull requests (``create_pr``), tags, multipart LFS
      uploads, LFS downloads through the batch API, pagination, ``expand``
      details (last commit, security scan) in tree listings, ``.gitignore``
      handling in preupload, and everything that is not about files (likes,
      discussions, cards, ...).

Needs the ``git`` executable (2.32 or newer).
"""

from __future__ import annotations

import argparse
import base64
import fnmatch
import hashlib
import json
import logging
import os
import re
import secrets
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Callable, Iterable, Iterator
from urllib.parse import parse_qs, unquote, urlsplit

logger = logging.getLogger(__name__)

LOOPBACK = "127.0.0.1"
DEFAULT_BRANCH = "main"
# The Hub forces files of 10 MiB or more into LFS.
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024
LFS_UPLOAD_TICKET_SECONDS = 3600
READ_CHUNK = 1024 * 1024
ZERO_OID = "0" * 40

LFS_POINTER_TEMPLATE = "version https://git-lfs.github.com/spec/v1\noid sha256:{oid}\nsize {size}\n"
LFS_POINTER_RE = re.compile(rb"version https://git-lfs\.github\.com/spec/v1\noid sha256:([0-9a-f]{64})\nsize (\d+)\n")
# A pointer is ~130 bytes; blobs larger than this are never read to look for one.
MAX_POINTER_SIZE = 200

# What the Hub puts in the .gitattributes of a new model repo (abridged).
INITIAL_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (
        "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gz", "*.h5", "*.joblib",
        "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot",
        "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors",
        "saved_model/**/*", "*.tar.*", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz",
        "*.zip", "*.zst", "*tfevents*",
    )
)

NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
BRANCH_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._/-]{0,199}")
COMMIT_OID_RE = re.compile(r"[0-9a-f]{40}")
SHA256_RE = re.compile(r"[0-9a-f]{64}")


class HubError(Exception):
    """An error answer in the Hub's format: JSON ``{"error": message}`` plus X-Error-* headers."""

    def __init__(self, status: int, message: str, error_code: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.error_code = error_code
        self.extra = extra or {}


def repo_not_found(repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {repo_id}", "RepoNotFound")


def revision_not_found(revision: str) -> HubError:
    return HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")


def entry_not_found(path: str, revision: str) -> HubError:
    return HubError(404, f'{path} does not exist on "{revision}"', "EntryNotFound")


class GitError(RuntimeError):
    pass


def run_git(*args: str, stdin: bytes | None = None, env: dict | None = None) -> bytes:
    full_env = {
        **os.environ,
        # Keep the user's git configuration (hooks, templates, signing, ...) out of the fixture.
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_TERMINAL_PROMPT": "0",
        **(env or {}),
    }
    result = subprocess.run(["git", "--literal-pathspecs", *args], input=stdin, capture_output=True, env=full_env)
    if result.returncode != 0:
        raise GitError(f"git {' '.join(args[:3])} failed: {result.stderr.decode(errors='replace').strip()}")
    return result.stdout


@dataclass(frozen=True)
class Entry:
    """One file or directory of a commit, as the Hub's tree API describes it."""

    path: str
    kind: str  # "file" or "directory"
    oid: str  # git object id (for LFS files: of the pointer)
    git_size: int  # size of the git blob (for LFS files: of the pointer)
    lfs_oid: str | None = None
    lfs_size: int | None = None

    @property
    def size(self) -> int:
        return self.lfs_size if self.lfs_oid is not None else self.git_size

    def to_json(self) -> dict:
        item = {"type": self.kind, "oid": self.oid, "size": self.size if self.kind == "file" else 0, "path": self.path}
        if self.lfs_oid is not None:
            item["lfs"] = {"oid": self.lfs_oid, "size": self.lfs_size, "pointerSize": self.git_size}
        return item


def lfs_pointer(oid: str, size: int) -> bytes:
    return LFS_POINTER_TEMPLATE.format(oid=oid, size=size).encode()


def is_valid_repo_path(path: object) -> bool:
    """A path inside the repo: relative, normalised, never touching .git."""
    if not isinstance(path, str) or not path or "\\" in path or "\0" in path:
        return False
    return not any(part in ("", ".", "..", ".git") for part in path.split("/"))


def validate_repo_path(path: object) -> str:
    if not is_valid_repo_path(path):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


class GitModelRepo:
    """A model repo stored as a git repository, with git-lfs objects under .git/lfs/objects."""

    def __init__(self, directory: Path, repo_id: str):
        self.directory = directory
        self.repo_id = repo_id
        self.git_dir = directory / ".git"
        self.lfs_objects_dir = self.git_dir / "lfs" / "objects"
        # Commits to one repo are serialised; update-ref's compare-and-swap is the second guard.
        self.commit_lock = threading.Lock()
        self.deleted = False  # set under commit_lock; a deleted repo takes no more uploads or commits

    # -- git plumbing -------------------------------------------------------------------------

    def git(self, *args: str, stdin: bytes | None = None, env: dict | None = None) -> bytes:
        return run_git("-C", str(self.directory), *args, stdin=stdin, env=env)

    def commit_exists(self, oid: str) -> bool:
        try:
            return self.git("cat-file", "-t", oid).strip() == b"commit"
        except GitError:
            return False

    def ref_target(self, ref: str) -> str | None:
        try:
            return self.git("rev-parse", "--verify", "--quiet", f"{ref}^{{commit}}").decode().strip() or None
        except GitError:
            return None

    def resolve(self, revision: str) -> str | None:
        """Commit id for a branch, tag, full ref or full commit id -- never git's rev syntax (HEAD~1, @{..})."""
        if COMMIT_OID_RE.fullmatch(revision):
            return revision if self.commit_exists(revision) else None
        if not BRANCH_RE.fullmatch(revision) or ".." in revision or revision.endswith((".lock", "/")):
            return None
        candidates = [revision] if revision.startswith("refs/") else [f"refs/heads/{revision}", f"refs/tags/{revision}"]
        for ref in candidates:
            target = self.ref_target(ref)
            if target is not None:
                return target
        return None

    def resolve_or_raise(self, revision: str) -> str:
        commit = self.resolve(revision)
        if commit is None:
            raise revision_not_found(revision)
        return commit

    def branches(self) -> dict[str, str]:
        output = self.git("for-each-ref", "--format=%(refname:strip=2) %(objectname)", "refs/heads/").decode()
        return dict(line.split(" ", 1) for line in output.splitlines())

    def commit_date(self, commit: str) -> str:
        timestamp = int(self.git("show", "-s", "--format=%ct", commit).strip())
        return datetime.fromtimestamp(timestamp, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")

    def first_commit_date(self, commit: str) -> str:
        root = self.git("rev-list", "--max-parents=0", commit).split()[-1].decode()
        return self.commit_date(root)

    def read_blobs(self, oids: Iterable[str]) -> dict[str, bytes]:
        oids = list(dict.fromkeys(oids))
        if not oids:
            return {}
        output = self.git("cat-file", "--batch", stdin="".join(f"{oid}\n" for oid in oids).encode())
        blobs, position = {}, 0
        for oid in oids:
            header_end = output.index(b"\n", position)
            size = int(output[position:header_end].split()[2])
            blobs[oid] = output[header_end + 1 : header_end + 1 + size]
            position = header_end + 1 + size + 1
        return blobs

    # -- reading trees ------------------------------------------------------------------------

    def _ls_tree(self, *args: str) -> list[Entry]:
        raw_entries = []
        for record in self.git("ls-tree", "-l", "-z", *args).split(b"\0"):
            if not record:
                continue
            meta, path = record.split(b"\t", 1)
            _mode, kind, oid, size = meta.decode().split()
            raw_entries.append((path.decode(), kind, oid, 0 if size == "-" else int(size)))
        # Small blobs may be LFS pointers: read them all in one git call.
        small_blobs = self.read_blobs(
            oid for _, kind, oid, size in raw_entries if kind == "blob" and size <= MAX_POINTER_SIZE
        )
        entries = []
        for path, kind, oid, size in raw_entries:
            pointer = LFS_POINTER_RE.fullmatch(small_blobs.get(oid, b""))
            if pointer:
                entries.append(Entry(path, "file", oid, size, pointer.group(1).decode(), int(pointer.group(2))))
            else:
                entries.append(Entry(path, "file" if kind == "blob" else "directory", oid, size))
        return entries

    def entry(self, commit: str, path: str) -> Entry | None:
        if not is_valid_repo_path(path):
            return None  # e.g. "../x": git would refuse it anyway, the Hub answers "not found"
        found = self._ls_tree(commit, "--", path)
        return found[0] if len(found) == 1 and found[0].path == path else None

    def list_directory(self, commit: str, path: str, recursive: bool) -> list[Entry] | None:
        """Entries below ``path`` ('' is the root), or None when it is not a directory."""
        if path:
            directory = self.entry(commit, path)
            if directory is None or directory.kind != "directory":
                return None
        recursion = ["-r", "-t"] if recursive else []
        return self._ls_tree(*recursion, commit, "--", *([f"{path}/"] if path else []))

    def all_files(self, commit: str) -> list[Entry]:
        return [entry for entry in self._ls_tree("-r", commit) if entry.kind == "file"]

    def lfs_patterns(self, commit: str) -> list[str]:
        attributes = self.entry(commit, ".gitattributes")
        if attributes is None:
            return []
        text = self.read_blobs([attributes.oid])[attributes.oid].decode(errors="replace")
        return [line.split()[0] for line in text.splitlines() if "filter=lfs" in line.split()[1:]]

    # -- LFS objects ---------------------------------------------------------------------------

    def lfs_object_path(self, oid: str) -> Path:
        return self.lfs_objects_dir / oid[0:2] / oid[2:4] / oid

    def has_lfs_object(self, oid: str, size: int | None = None) -> bool:
        path = self.lfs_object_path(oid)
        return path.is_file() and (size is None or path.stat().st_size == size)

    def open_content(self, entry: Entry) -> Callable[[int, int], Iterator[bytes]]:
        """A reader for bytes [start, end) of a file entry, LFS or not."""
        if entry.lfs_oid is not None:
            object_path = self.lfs_object_path(entry.lfs_oid)

            def read_lfs(start: int, end: int) -> Iterator[bytes]:
                with open(object_path, "rb") as handle:
                    handle.seek(start)
                    remaining = end - start
                    while remaining > 0:
                        chunk = handle.read(min(READ_CHUNK, remaining))
                        if not chunk:
                            raise OSError(f"LFS object {entry.lfs_oid} is shorter than its pointer says")
                        remaining -= len(chunk)
                        yield chunk

            return read_lfs
        content = self.read_blobs([entry.oid])[entry.oid]
        return lambda start, end: iter([content[start:end]])

    # -- writing -------------------------------------------------------------------------------

    def create_commit(
        self,
        branch: str,
        expected_head: str | None,
        additions: dict[str, bytes],
        deleted_files: list[str],
        deleted_folders: list[str],
        message: str,
        author: str,
    ) -> str:
        """Commit on ``branch`` atomically; ``expected_head`` None means the branch must not exist yet."""
        identity = {
            "GIT_AUTHOR_NAME": author,
            "GIT_AUTHOR_EMAIL": f"{author}@users.noreply.localhost",
            "GIT_COMMITTER_NAME": author,
            "GIT_COMMITTER_EMAIL": f"{author}@users.noreply.localhost",
        }
        # The new tree is assembled in a private index file; the branch only moves at the very end.
        with tempfile.TemporaryDirectory(dir=self.git_dir, prefix="commit-") as scratch:
            env = {**identity, "GIT_INDEX_FILE": os.path.join(scratch, "index")}
            if expected_head is not None:
                self.git("read-tree", expected_head, env=env)
            index_lines = []
            for folder in deleted_folders:
                listing = self.git("ls-files", "-z", "--", f"{folder.rstrip('/')}/", env=env).decode()
                inside = [path for path in listing.split("\0") if path]
                if not inside:
                    raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                index_lines += [f"0 {ZERO_OID}\t{path}" for path in inside]
            for path in deleted_files:
                if not self.git("ls-files", "-z", "--", path, env=env).startswith(path.encode() + b"\0"):
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                index_lines.append(f"0 {ZERO_OID}\t{path}")
            for path, content in additions.items():
                blob = self.git("hash-object", "-w", "--stdin", stdin=content).decode().strip()
                index_lines.append(f"100644 {blob}\t{path}")
            if index_lines:
                stdin = "".join(line + "\n" for line in index_lines).encode()
                try:
                    self.git("update-index", "--index-info", stdin=stdin, env=env)
                except GitError as error:
                    raise HubError(400, f"Cannot build the commit tree: {error}") from error
            tree = self.git("write-tree", env=env).decode().strip()
            parents = ["-p", expected_head] if expected_head is not None else []
            commit = self.git("commit-tree", tree, *parents, stdin=message.encode(), env=env).decode().strip()
            try:
                self.git("update-ref", f"refs/heads/{branch}", commit, expected_head or ZERO_OID)
            except GitError as error:
                raise HubError(412, "A commit has happened since. Please refresh and try again.") from error
        return commit


class HubStore:
    """Repos, accounts and pending LFS uploads of one server."""

    def __init__(self, root: Path, tokens: dict[str, str], organizations: dict[str, Iterable[str]]):
        self.root = Path(root)
        self.tokens = dict(tokens)  # token -> user name
        self.organizations = {org: set(members) for org, members in organizations.items()}
        self.users = set(self.tokens.values())
        self.incoming_dir = self.root / ".incoming"
        self.incoming_dir.mkdir(parents=True, exist_ok=True)
        self._repos: dict[str, GitModelRepo] = {}
        self._repos_lock = threading.Lock()
        # ticket -> (repo, oid, size, expiry): what one pre-authorised PUT may store.
        self._upload_tickets: dict[str, tuple[GitModelRepo, str, int, float]] = {}
        self._tickets_lock = threading.Lock()

    # -- accounts ------------------------------------------------------------------------------

    def user_for(self, authorization: str | None) -> str:
        if not authorization:
            raise HubError(
                401,
                "Authentication required: this endpoint needs a token with write access "
                "(pass `token=...` or set HF_TOKEN).",
            )
        scheme, _, token = authorization.partition(" ")
        user = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return user

    def check_can_write(self, user: str, namespace: str) -> None:
        if namespace not in self.users and namespace not in self.organizations:
            raise HubError(404, f"Namespace '{namespace}' does not exist on this Hub.")
        if namespace != user and user not in self.organizations.get(namespace, ()):
            raise HubError(403, f'You don\'t have the rights to create a model under the namespace "{namespace}"')

    # -- repos ---------------------------------------------------------------------------------

    def repo_dir(self, namespace: str, name: str) -> Path:
        return self.root / "models" / namespace / name

    def get_repo(self, namespace: str, name: str) -> GitModelRepo:
        repo_id = f"{namespace}/{name}"
        if not NAME_RE.fullmatch(namespace) or not NAME_RE.fullmatch(name):
            raise repo_not_found(repo_id)
        with self._repos_lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                directory = self.repo_dir(namespace, name)
                if not (directory / ".git").is_dir():
                    raise repo_not_found(repo_id)
                repo = self._repos[repo_id] = GitModelRepo(directory, repo_id)
            return repo

    def create_repo(self, namespace: str, name: str, author: str) -> bool:
        """Create the repo with the Hub's initial commit; False when it already exists."""
        final_dir = self.repo_dir(namespace, name)
        if final_dir.exists():
            return False
        final_dir.parent.mkdir(parents=True, exist_ok=True)
        # Built aside and renamed into place, so a half-initialised repo is never visible.
        staging_dir = Path(tempfile.mkdtemp(dir=final_dir.parent, prefix=f".creating-{name}-"))
        staging_dir.chmod(0o755)  # mkdtemp's 0700 would follow the repo after the rename
        try:
            run_git("init", "-q", "-b", DEFAULT_BRANCH, str(staging_dir))
            staging = GitModelRepo(staging_dir, f"{namespace}/{name}")
            initial_files = {".gitattributes": INITIAL_GITATTRIBUTES.encode()}
            staging.create_commit(DEFAULT_BRANCH, None, initial_files, [], [], "initial commit", author)
            try:
                os.rename(staging_dir, final_dir)
            except OSError:
                return False  # created concurrently
        finally:
            shutil.rmtree(staging_dir, ignore_errors=True)
        return True

    def delete_repo(self, namespace: str, name: str) -> None:
        """Delete the repo: it disappears at once (one rename), then its files are removed."""
        repo = self.get_repo(namespace, name)
        # Both locks: no request may look the repo up, commit to it or store an upload in it meanwhile.
        with self._repos_lock, repo.commit_lock:
            repo.deleted = True
            self._repos.pop(repo.repo_id, None)
            trash_dir = Path(tempfile.mkdtemp(dir=repo.directory.parent, prefix=f".deleting-{name}-"))
            os.rename(repo.directory, trash_dir / name)
        shutil.rmtree(trash_dir)

    # -- LFS uploads ---------------------------------------------------------------------------

    def issue_upload_ticket(self, repo: GitModelRepo, oid: str, size: int) -> str:
        ticket = secrets.token_urlsafe(24)
        with self._tickets_lock:
            self._upload_tickets[ticket] = (repo, oid, size, time.monotonic() + LFS_UPLOAD_TICKET_SECONDS)
        return ticket

    def store_upload(self, ticket: str, body: Iterator[bytes]) -> str:
        """Stream an upload to a scratch file; keep it only if sha256 and size match the ticket."""
        with self._tickets_lock:
            repo, oid, size, expiry = self._upload_tickets.get(ticket, (None, "", 0, 0.0))
        if repo is None or expiry < time.monotonic():
            raise HubError(403, "This LFS upload URL is unknown or has expired; request a new one from the batch API.")
        digest, received = hashlib.sha256(), 0
        handle, scratch_path = tempfile.mkstemp(dir=self.incoming_dir, prefix=f"{oid}-")
        try:
            with os.fdopen(handle, "wb") as scratch:
                for chunk in body:
                    digest.update(chunk)
                    received += len(chunk)
                    scratch.write(chunk)
            if received != size or digest.hexdigest() != oid:
                raise HubError(
                    400,
                    f"LFS upload rejected: expected {size} bytes with sha256 {oid}, "
                    f"received {received} bytes with sha256 {digest.hexdigest()}.",
                )
            with repo.commit_lock:
                if repo.deleted:
                    raise repo_not_found(repo.repo_id)
                target = repo.lfs_object_path(oid)
                target.parent.mkdir(parents=True, exist_ok=True)
                os.replace(scratch_path, target)
        finally:
            if os.path.exists(scratch_path):
                os.unlink(scratch_path)
        with self._tickets_lock:
            self._upload_tickets.pop(ticket, None)
        return oid


class HubRequestHandler(BaseHTTPRequestHandler):
    """Routes Hub protocol requests to the store; see the module docstring for the list."""

    protocol_version = "HTTP/1.1"  # keep-alive, as huggingface_hub's pooled client expects
    server: "HubHTTPServer"

    SEGMENT = r"([^/]+)"
    REPO = r"/([^/]+)/([^/]+)"
    ROUTES: list[tuple[str, re.Pattern, str]] = [
        (method, re.compile(pattern), handler)
        for method, pattern, handler in [
            ("GET", r"/api/whoami-v2", "whoami"),
            ("POST", r"/api/repos/create", "create_repo"),
            ("DELETE", r"/api/repos/delete", "delete_repo"),
            ("POST", r"/api/validate-yaml", "validate_yaml"),
            ("GET", r"/api/models" + REPO, "repo_info"),
            ("GET", r"/api/models" + REPO + r"/revision/" + SEGMENT, "repo_info"),
            ("GET", r"/api/models" + REPO + r"/refs", "list_refs"),
            ("GET", r"/api/models" + REPO + r"/tree/" + SEGMENT + r"(?:/(.*))?", "list_tree"),
            ("POST", r"/api/models" + REPO + r"/paths-info/" + SEGMENT, "paths_info"),
            ("POST", r"/api/models" + REPO + r"/preupload/" + SEGMENT, "preupload"),
            ("POST", r"/api/models" + REPO + r"/commit/" + SEGMENT, "commit"),
            ("POST", r"/api/models" + REPO + r"/branch/" + SEGMENT, "create_branch"),
            ("GET", r"/api/models" + REPO + r"/xet-(?:read|write)-token/" + SEGMENT, "xet_not_offered"),
            ("POST", REPO + r"\.git/info/lfs/objects/batch", "lfs_batch"),
            ("POST", REPO + r"\.git/info/lfs/objects/verify", "lfs_verify"),
            ("PUT", r"/lfs-upload/" + SEGMENT, "lfs_upload"),
            ("GET", REPO + r"/resolve/" + SEGMENT + r"/(.+)", "resolve"),
        ]
    ]

    # -- plumbing ------------------------------------------------------------------------------

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")

    def do_DELETE(self) -> None:
        self._dispatch("DELETE")

    def log_message(self, format: str, *args) -> None:
        logger.debug("%s %s", self.address_string(), format % args)

    @property
    def store(self) -> HubStore:
        return self.server.store

    @property
    def base_url(self) -> str:
        return self.server.url

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        self.query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        self._body_pending = self._has_body()
        route_method = "GET" if method == "HEAD" else method
        try:
            for allowed, pattern, handler in self.ROUTES:
                match = pattern.fullmatch(url.path)
                if match and allowed == route_method:
                    # Segments are matched percent-encoded (a revision may be "refs%2Fpr%2F1"), then decoded.
                    args = [unquote(group) if group is not None else "" for group in match.groups()]
                    getattr(self, handler)(*args)
                    break
            else:
                raise HubError(404, f"Sorry, we can't find the page you are looking for: {method} {url.path}")
        except HubError as error:
            self._send_error(error)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as error:  # a bug in the fixture: answer 500 and leave a trace in the log
            logger.exception("hub test server failed on %s %s", method, self.path)
            self._send_error(HubError(500, f"Internal error in the test Hub: {error!r}"))
        if self._body_pending:
            # Unread request bytes would be parsed as the next request on this connection.
            self.close_connection = True

    def _send_error(self, error: HubError) -> None:
        # Header values must be latin-1; the JSON body keeps the full message.
        headers = {"X-Error-Message": error.message.encode("ascii", "replace").decode()}
        if error.error_code:
            headers["X-Error-Code"] = error.error_code
        try:
            self._send_json({"error": error.message, **error.extra}, error.status, headers)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # e.g. the client that interrupted an upload is gone

    def _send_json(
        self, payload: object, status: int = 200, headers: dict | None = None, content_type: str = "application/json"
    ) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _has_body(self) -> bool:
        return self._is_chunked() or int(self.headers.get("Content-Length") or 0) > 0

    def _iter_body(self) -> Iterator[bytes]:
        """The request body in chunks, for Content-Length and chunked transfer encoding alike."""
        if self._is_chunked():
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                chunk = self.rfile.read(size)
                self.rfile.readline()
                if len(chunk) < size:
                    raise HubError(400, "Request body ended before its last chunk was received")
                yield chunk
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining > 0:
                chunk = self.rfile.read(min(READ_CHUNK, remaining))
                if not chunk:
                    # The client went away mid-upload; the caller must keep nothing of it.
                    raise HubError(400, "Request body ended before Content-Length bytes were received")
                remaining -= len(chunk)
                yield chunk
        self._body_pending = False

    def _read_body(self) -> bytes:
        return b"".join(self._iter_body())

    def _read_json(self) -> dict:
        try:
            payload = json.loads(self._read_body() or b"{}")
        except json.JSONDecodeError as error:
            raise HubError(400, f"Request body is not valid JSON: {error}") from error
        if not isinstance(payload, dict):
            raise HubError(400, "Request body must be a JSON object")
        return payload

    def _writer(self, namespace: str) -> str:
        user = self.store.user_for(self.headers.get("Authorization"))
        self.store.check_can_write(user, namespace)
        return user

    def _repo_url(self, repo: GitModelRepo) -> str:
        return f"{self.base_url}/{repo.repo_id}"

    # -- accounts ------------------------------------------------------------------------------

    def whoami(self) -> None:
        user = self.store.user_for(self.headers.get("Authorization"))
        orgs = sorted(org for org, members in self.store.organizations.items() if user in members)
        self._send_json(
            {
                "type": "user",
                "id": hashlib.sha1(user.encode()).hexdigest()[:24],
                "name": user,
                "fullname": user,
                "email": f"{user}@users.noreply.localhost",
                "canPay": False,
                "orgs": [{"type": "org", "name": org, "fullname": org, "roleInOrg": "write"} for org in orgs],
                "auth": {"type": "access_token", "accessToken": {"displayName": "test token", "role": "write"}},
            }
        )

    def validate_yaml(self) -> None:
        content = self._read_json().get("content", "")
        front_matter = re.match(r"^---\n(.*?)\n---", content, flags=re.S)
        if front_matter:
            import yaml  # PyYAML comes with transformers and huggingface_hub's card support

            try:
                metadata = yaml.safe_load(front_matter.group(1))
            except yaml.YAMLError as error:
                self._send_json({"errors": [{"message": f"Invalid YAML in README.md: {error}"}]}, 400)
                return
            if metadata is not None and not isinstance(metadata, dict):
                self._send_json({"errors": [{"message": "README.md metadata must be a YAML mapping"}]}, 400)
                return
        self._send_json({"errors": [], "warnings": []})

    # -- repos ---------------------------------------------------------------------------------

    def create_repo(self) -> None:
        request = self._read_json()
        user = self.store.user_for(self.headers.get("Authorization"))
        namespace, name = request.get("organization") or user, request.get("name")
        if request.get("type", "model") not in (None, "model"):
            raise HubError(400, "This test Hub only hosts model repos.")
        if not isinstance(name, str) or not NAME_RE.fullmatch(name) or name.endswith(".git"):
            raise HubError(400, f"Invalid repo name: {name!r}")
        self.store.check_can_write(user, namespace)
        url = f"{self.base_url}/{namespace}/{name}"
        if not self.store.create_repo(namespace, name, user):
            raise HubError(409, "You already created this model repo", extra={"url": url})
        self._send_json({"url": url, "name": f"{namespace}/{name}", "id": f"{namespace}/{name}"})

    def delete_repo(self) -> None:
        request = self._read_json()
        user = self.store.user_for(self.headers.get("Authorization"))
        namespace, name = request.get("organization") or user, request.get("name")
        if request.get("type", "model") not in (None, "model"):
            raise HubError(400, "This test Hub only hosts model repos.")
        if not isinstance(name, str):
            raise HubError(400, f"Invalid repo name: {name!r}")
        self.store.get_repo(namespace, name)  # 404 for a repo that does not exist, before any rights are checked
        self.store.check_can_write(user, namespace)
        self.store.delete_repo(namespace, name)
        logger.info("%s deleted %s/%s", user, namespace, name)
        self._send_json({})

    def repo_info(self, namespace: str, name: str, revision: str = DEFAULT_BRANCH) -> None:
        repo = self.store.get_repo(namespace, name)
        commit = repo.resolve_or_raise(revision)
        with_blobs = self.query.get("blobs", "").lower() == "true"
        siblings = []
        for entry in repo.all_files(commit):
            sibling = {"rfilename": entry.path}
            if with_blobs:
                sibling.update(size=entry.size, blobId=entry.oid)
                if entry.lfs_oid is not None:
                    sibling["lfs"] = {"sha256": entry.lfs_oid, "size": entry.lfs_size, "pointerSize": entry.git_size}
            siblings.append(sibling)
        self._send_json(
            {
                "_id": hashlib.sha1(repo.repo_id.encode()).hexdigest()[:24],
                "id": repo.repo_id,
                "modelId": repo.repo_id,
                "author": namespace,
                "sha": commit,
                "lastModified": repo.commit_date(commit),
                "createdAt": repo.first_commit_date(commit),
                "private": False,
                "gated": False,
                "disabled": False,
                "downloads": 0,
                "likes": 0,
                "tags": [],
                "siblings": siblings,
            }
        )

    def list_refs(self, namespace: str, name: str) -> None:
        repo = self.store.get_repo(namespace, name)
        branches = [
            {"name": branch, "ref": f"refs/heads/{branch}", "targetCommit": target}
            for branch, target in sorted(repo.branches().items())
        ]
        self._send_json({"branches": branches, "tags": [], "converts": []})

    def create_branch(self, namespace: str, name: str, branch: str) -> None:
        user = self._writer(namespace)
        repo = self.store.get_repo(namespace, name)
        request = self._read_json()
        if not BRANCH_RE.fullmatch(branch) or branch.startswith("refs/") or ".." in branch:
            raise HubError(400, f"Invalid branch name: {branch!r}")
        start = repo.resolve_or_raise(request.get("startingPoint") or DEFAULT_BRANCH)
        try:
            repo.git("update-ref", f"refs/heads/{branch}", start, ZERO_OID)
        except GitError as error:
            raise HubError(409, f"Reference already exists: refs/heads/{branch}") from error
        logger.info("%s created branch %s of %s", user, branch, repo.repo_id)
        self._send_json({})

    def list_tree(self, namespace: str, name: str, revision: str, path: str) -> None:
        repo = self.store.get_repo(namespace, name)
        commit = repo.resolve_or_raise(revision)
        path = path.strip("/")
        entries = repo.list_directory(commit, path, recursive=self.query.get("recursive", "").lower() == "true")
        if entries is None:
            raise entry_not_found(path, revision)
        self._send_json([entry.to_json() for entry in entries])

    def paths_info(self, namespace: str, name: str, revision: str) -> None:
        repo = self.store.get_repo(namespace, name)
        commit = repo.resolve_or_raise(revision)
        body = self._read_body()
        # huggingface_hub and olah both send a form; accept JSON too.
        if self.headers.get("Content-Type", "").startswith("application/json"):
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode()).get("paths", [])
        paths = [paths] if isinstance(paths, str) else paths
        found = [repo.entry(commit, path.strip("/")) for path in paths]
        self._send_json([entry.to_json() for entry in found if entry is not None])

    # -- uploads -------------------------------------------------------------------------------

    def _writable_branch(self, repo: GitModelRepo, revision: str) -> tuple[str, str]:
        branch = revision.removeprefix("refs/heads/")
        head = repo.ref_target(f"refs/heads/{branch}") if BRANCH_RE.fullmatch(branch) else None
        if head is None:
            raise revision_not_found(revision)
        return branch, head

    def preupload(self, namespace: str, name: str, revision: str) -> None:
        self._writer(namespace)
        repo = self.store.get_repo(namespace, name)
        request = self._read_json()
        if self.query.get("create_pr"):
            raise HubError(400, "This test Hub does not support pull requests (create_pr).")
        _, head = self._writable_branch(repo, revision)
        lfs_patterns = repo.lfs_patterns(head)
        answers = []
        for file in request.get("files", []):
            path = validate_repo_path(file.get("path"))
            sample = base64.b64decode(file.get("sample") or "")
            tracked = any(
                fnmatch.fnmatchcase(path if "/" in pattern else path.rsplit("/", 1)[-1], pattern)
                for pattern in lfs_patterns
            )
            use_lfs = tracked or int(file.get("size", 0)) >= LFS_SIZE_THRESHOLD or b"\0" in sample
            existing = repo.entry(head, path)
            # The client compares this with its own oid to skip unchanged files.
            remote_oid = None if existing is None else (existing.lfs_oid or existing.oid)
            answers.append(
                {"path": path, "uploadMode": "lfs" if use_lfs else "regular", "shouldIgnore": False, "oid": remote_oid}
            )
        self._send_json({"files": answers, "commitOid": head})

    def lfs_batch(self, namespace: str, name: str) -> None:
        self._writer(namespace)
        repo = self.store.get_repo(namespace, name)
        request = self._read_json()
        if request.get("operation") != "upload":
            raise HubError(400, "This test Hub only accepts LFS uploads through the batch API.")
        if "basic" not in request.get("transfers", ["basic"]):
            raise HubError(422, "Only the 'basic' LFS transfer is offered.")
        objects = []
        for item in request.get("objects", []):
            oid, size = item.get("oid"), item.get("size")
            if not isinstance(oid, str) or not SHA256_RE.fullmatch(oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": str(oid), "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
            elif repo.has_lfs_object(oid, size):
                objects.append({"oid": oid, "size": size})  # no actions: already stored
            else:
                ticket = self.store.issue_upload_ticket(repo, oid, size)
                objects.append({
                    "oid": oid,
                    "size": size,
                    "authenticated": True,
                    "actions": {
                        "upload": {
                            "href": f"{self.base_url}/lfs-upload/{ticket}",
                            "expires_in": LFS_UPLOAD_TICKET_SECONDS,
                        },
                        "verify": {"href": f"{self._repo_url(repo)}.git/info/lfs/objects/verify"},
                    },
                })
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        content_type="application/vnd.git-lfs+json")

    def lfs_upload(self, ticket: str) -> None:
        oid = self.store.store_upload(ticket, self._iter_body())
        self.send_response(200)
        self.send_header("ETag", f'"{oid}"')
        self.send_header("Content-Length", "0")
        self.end_headers()

    def lfs_verify(self, namespace: str, name: str) -> None:
        self._writer(namespace)
        repo = self.store.get_repo(namespace, name)
        request = self._read_json()
        if not repo.has_lfs_object(str(request.get("oid")), request.get("size")):
            raise HubError(404, f"LFS object {request.get('oid')} of size {request.get('size')} was not uploaded.")
        self._send_json({"success": True})

    def commit(self, namespace: str, name: str, revision: str) -> None:
        user = self._writer(namespace)
        repo = self.store.get_repo(namespace, name)
        if self.query.get("create_pr"):
            raise HubError(400, "This test Hub does not support pull requests (create_pr).")
        header, additions, deleted_files, deleted_folders = None, {}, [], []
        # Everything is parsed and checked before git is touched.
        for number, line in enumerate(self._read_body().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (json.JSONDecodeError, KeyError, TypeError) as error:
                raise HubError(400, f"Malformed commit payload at line {number}") from error
            if key == "header":
                header = value
            elif key == "file":
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding {value.get('encoding')!r} for {value.get('path')}")
                additions[validate_repo_path(value.get("path"))] = base64.b64decode(value.get("content", ""))
            elif key == "lfsFile":
                path, oid = validate_repo_path(value.get("path")), value.get("oid")
                if value.get("algo", "sha256") != "sha256" or not isinstance(oid, str) or not SHA256_RE.fullmatch(oid):
                    raise HubError(400, f"Invalid LFS reference for {path}")
                if not repo.has_lfs_object(oid, value.get("size")):
                    raise HubError(
                        400,
                        f"Your push was rejected because an LFS pointer pointed to a file that does not exist: "
                        f"{path} (sha256 {oid}). Upload it through the LFS batch API first.",
                    )
                additions[path] = lfs_pointer(oid, repo.lfs_object_path(oid).stat().st_size)
            elif key == "deletedFile":
                deleted_files.append(validate_repo_path(value.get("path")))
            elif key == "deletedFolder":
                deleted_folders.append(validate_repo_path(value.get("path", "").rstrip("/")))
            else:
                raise HubError(400, f"Unknown commit operation {key!r} at line {number}")
        if not isinstance(header, dict) or not str(header.get("summary", "")).strip():
            raise HubError(400, "A commit needs a header line with a non-empty summary")
        message = header["summary"].strip() + ("\n\n" + header["description"] if header.get("description") else "")
        with repo.commit_lock:
            if repo.deleted:
                raise repo_not_found(repo.repo_id)
            branch, head = self._writable_branch(repo, revision)
            parent = header.get("parentCommit")
            if parent is not None and parent != head:
                raise HubError(412, "A commit has happened since. Please refresh and try again.")
            commit = repo.create_commit(branch, head, additions, deleted_files, deleted_folders, message, user)
        logger.info("%s committed %s to %s@%s", user, commit, repo.repo_id, branch)
        self._send_json({
            "success": True,
            "commitOid": commit,
            "commitUrl": f"{self._repo_url(repo)}/commit/{commit}",
            "hookOutput": "",
            "pullRequestUrl": None,
        })

    def xet_not_offered(self, namespace: str, name: str, revision: str) -> None:
        raise HubError(
            501,
            "This Hub stores large files with plain Git LFS and does not offer Xet storage. "
            "Set HF_HUB_DISABLE_XET=1 so huggingface_hub uploads through LFS.",
        )

    # -- downloads -----------------------------------------------------------------------------

    def resolve(self, namespace: str, name: str, revision: str, path: str) -> None:
        repo = self.store.get_repo(namespace, name)
        commit = repo.resolve_or_raise(revision)
        entry = repo.entry(commit, path)
        if entry is None or entry.kind != "file":
            raise entry_not_found(path, revision)
        headers = {"X-Repo-Commit": commit, "Accept-Ranges": "bytes", "Content-Type": "application/octet-stream"}
        if entry.lfs_oid is not None:
            # Like the Hub: the cache key is the content's sha256, announced in X-Linked-* too.
            headers.update(
                {"ETag": f'"{entry.lfs_oid}"', "X-Linked-Etag": f'"{entry.lfs_oid}"', "X-Linked-Size": str(entry.size)}
            )
        else:
            headers["ETag"] = f'"{entry.oid}"'
        start, end, status = 0, entry.size, 200
        byte_range = re.fullmatch(r"bytes=(\d*)-(\d*)", self.headers.get("Range", "").strip())
        if byte_range and byte_range.group(1) + byte_range.group(2):
            first, last = byte_range.groups()
            start = int(first) if first else max(entry.size - int(last), 0)
            end = min(int(last) + 1, entry.size) if first and last else entry.size
            if start >= end:
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{entry.size}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{entry.size}"
        # Anything else in Range (several ranges) is ignored and the whole file is sent, as RFC 9110 allows.
        self.send_response(status)
        for header_name, value in headers.items():
            self.send_header(header_name, value)
        self.send_header("Content-Length", str(end - start))
        self.end_headers()
        if self.command == "HEAD":
            return
        for chunk in repo.open_content(entry)(start, end):
            self.wfile.write(chunk)


class HubHTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, store: HubStore, port: int = 0):
        super().__init__((LOOPBACK, port), HubRequestHandler)
        self.store = store
        self.url = f"http://{LOOPBACK}:{self.server_address[1]}"


class HubServer:
    """The push server running in a background thread of the current process."""

    def __init__(self, root: Path, tokens: dict[str, str], organizations: dict[str, Iterable[str]], port: int = 0):
        self.store = HubStore(root, tokens, organizations)
        self.httpd = HubHTTPServer(self.store, port)
        self.url = self.httpd.url
        self._thread = threading.Thread(target=self.httpd.serve_forever, name="hub-test-server", daemon=True)

    def start(self) -> "HubServer":
        self._thread.start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()
        self._thread.join(timeout=10)

    def branch_head(self, repo_id: str, branch: str = DEFAULT_BRANCH) -> str | None:
        """Where ``branch`` of ``repo_id`` points now, read straight from git (None if absent)."""
        namespace, name = repo_id.split("/")
        try:
            repo = self.store.get_repo(namespace, name)
        except HubError:
            return None
        return repo.ref_target(f"refs/heads/{branch}")


def main() -> None:
    parser = argparse.ArgumentParser(description="Run the test Hub push server on loopback.")
    parser.add_argument("--root", required=True, type=Path, help="where repos are stored (<root>/models/<ns>/<name>)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--token", action="append", default=[], metavar="TOKEN:USER", help="an accepted token")
    parser.add_argument("--org", action="append", default=[], metavar="ORG:USER[,USER]", help="an organization")
    args = parser.parse_args()
    tokens = dict(item.split(":", 1) for item in args.token)
    organizations = {org: members.split(",") for org, members in (item.split(":", 1) for item in args.org)}
    logging.basicConfig(level=logging.INFO)
    server = HubServer(args.root, tokens, organizations, args.port)
    print(f"Hub test server on {server.url}, repos in {args.root}", flush=True)
    try:
        server.httpd.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.httpd.server_close()


if __name__ == "__main__":
    main()
