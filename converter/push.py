"""Upload a finished qconv output to the Hugging Face Hub as one commit (``qconv convert --push``).

The push goes through ``huggingface_hub``'s ``create_commit``: every large file is pre-uploaded (LFS or
Xet, content-addressed by sha256) before the single commit is made, so an interrupted push re-run with
the same arguments skips what already arrived and completes. The token comes from the argument,
``HF_TOKEN`` or the stored login, and never appears in a log line, a message or a written file.
"""

from __future__ import annotations

import logging
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from qconv.errors import QconvError
from qconv.format import MANIFEST_NAME, Manifest, check_manifest_files, read_manifest

logger = logging.getLogger(__name__)

REPO_SUFFIX = "-bnb-4bit"
#: Remote files that do not count as content (the Hub creates ``.gitattributes`` with every repo).
HUB_HOUSEKEEPING = frozenset({".gitattributes"})


@dataclass
class PushPlan:
    """What a push will do: target, files (relative path -> (local path, size, sha256)), deletions."""

    repo_id: str
    endpoint: str
    files: dict[str, tuple[Path, int, str]]
    commit_message: str
    commit_description: str
    exists: bool = False
    identical: bool = False
    parent_commit: str | None = None
    private: bool | None = None  # of the existing repo
    deletions: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(size for _, size, _ in self.files.values())

    def describe(self) -> str:
        """A few lines for people: target, state, then one line per file with its size."""
        state = "identical content already there" if self.identical else "exists" if self.exists else "new repo"
        lines = [f"push to {self.endpoint}/{self.repo_id} ({state}): {len(self.files)} files, "
                 f"{_human(self.total_bytes)}", f"  commit: {self.commit_message}"]
        lines += [f"  {_human(size):>10}  {rel}" for rel, (_, size, _) in sorted(self.files.items())]
        lines += [f"  {'delete':>10}  {rel}" for rel in self.deletions]
        return "\n".join(lines)


def push_output(
    out_dir: Path,
    *,
    repo_id: str | None = None,
    namespace: str | None = None,
    private: bool = False,
    token: str | None = None,
    overwrite: bool = False,
    dry_run: bool = False,
) -> str:
    """Push the qconv output in ``out_dir`` to the Hub; return the repo id pushed to.

    The repo defaults to ``<namespace or token user>/<source name>-bnb-4bit``. An existing repo with other
    content is refused unless ``overwrite`` (remote files absent locally are then deleted in the same
    commit) or its manifest lists the same files with the same sha256. ``dry_run`` resolves the target and
    logs what would be uploaded, without writing anything on the Hub.
    """
    out_dir = Path(out_dir)
    token = resolve_token(token)
    if token is None and not dry_run:
        raise QconvError("push: no Hugging Face token; pass --token, set HF_TOKEN, or run `hf auth login`")
    with _hub_errors(repo_id or namespace or "the Hub", token) as errors:
        plan = plan_push(out_dir, repo_id=repo_id, namespace=namespace, token=token, overwrite=overwrite)
        errors.where = plan.repo_id
        if dry_run:
            logger.info("dry run, nothing uploaded:\n%s", plan.describe())
            return plan.repo_id
        _upload(plan, private=private, token=token)
    return plan.repo_id


def resolve_token(token: str | None = None) -> str | None:
    """``token``, else ``HF_TOKEN``, else the token stored by ``hf auth login`` (None when there is none)."""
    if token:
        return token
    from huggingface_hub import get_token

    return get_token()


def hub_endpoint() -> str:
    """The Hub URL in use: ``HF_ENDPOINT`` read now, else huggingface_hub's configured endpoint."""
    from huggingface_hub import constants

    return (os.environ.get("HF_ENDPOINT") or constants.ENDPOINT).rstrip("/")


def default_repo_name(manifest: Manifest) -> str:
    """``<last path component of the source id>-bnb-4bit`` with characters the Hub refuses replaced."""
    return repo_name_for_source(str(manifest.source.get("id") or "model"))


def repo_name_for_source(source: str) -> str:
    """The default repo name for a source id, path or ``.gguf`` file: its last component + ``-bnb-4bit``."""
    name = re.split(r"[/\\]", source.rstrip("/\\"))[-1]
    name = re.sub(r"\.gguf$", "", name, flags=re.I)
    name = re.sub(r"[^A-Za-z0-9_.\-]+", "-", name)
    name = re.sub(r"[-.]{2,}", "-", name).strip("-.") or "model"
    return name[: 96 - len(REPO_SUFFIX)] + REPO_SUFFIX


def target_repo_id(source: str, *, repo_id: str | None, namespace: str | None, token: str | None) -> str:
    """The repo a ``convert --push`` will upload to, decided before converting (so a missing token fails fast
    and the model card can name the repo): ``repo_id``, else ``<namespace or the token's user>/<name>-bnb-4bit``."""
    if repo_id:
        return repo_id
    if not namespace:
        from huggingface_hub import HfApi

        token = resolve_token(token)
        if token is None:
            raise QconvError("push: no token to find your user name; pass --token (or set HF_TOKEN), "
                             "--repo-id or --namespace")
        try:
            namespace = HfApi(endpoint=hub_endpoint(), token=token).whoami(token=token)["name"]
        except Exception as exc:  # noqa: BLE001 - mapped to a message for people
            mapped = _map_error(exc, "whoami")
            raise (mapped or exc) from None
    return f"{namespace}/{repo_name_for_source(str(source))}"


def describe_source(manifest: Manifest) -> tuple[str, str]:
    """(source, revision) for the commit message: a Hub id and commit, or a local name and content hash.

    Local paths are reduced to their last component, so a commit never shows the converting machine's paths.
    """
    src = manifest.source or {}
    ident = str(src.get("id") or "unknown source")
    if src.get("kind") in ("dir", "gguf") or (src.get("kind") is None and not src.get("revision")):
        ident = re.split(r"[/\\]", ident.rstrip("/\\"))[-1] or ident
        sha = src.get("sha256")
        return ident, f"sha256:{sha[:12]}" if sha else f"local {src.get('kind') or 'files'}"
    return ident, str(src.get("revision") or "unknown revision")


def local_files(out_dir: Path, manifest: Manifest) -> dict[str, tuple[Path, int, str]]:
    """Every file to upload (hidden entries skipped), checked against the manifest's sha256 values."""
    found: dict[str, tuple[Path, int, str]] = {}
    for path in sorted(out_dir.rglob("*")):
        rel = path.relative_to(out_dir).as_posix()
        if path.is_dir() or any(part.startswith(".") for part in rel.split("/")):
            continue
        if path.is_symlink() and not path.resolve().is_relative_to(out_dir.resolve()):
            raise QconvError(f"{path}: a symlink pointing outside the output directory; refusing to upload it")
        found[rel] = (path, path.stat().st_size, "")
    for check in check_manifest_files(out_dir, manifest):
        if check.path is None:
            raise QconvError(check.problem)
        if check.rel not in found or check.problem == "missing":
            raise QconvError(f"{out_dir}: {check.rel} is listed in {MANIFEST_NAME} but missing; re-run qconv convert")
        if check.problem == "sha256":
            raise QconvError(f"{check.path}: sha256 differs from {MANIFEST_NAME} (modified after conversion?); "
                             "re-run qconv convert")
        found[check.rel] = (check.path, found[check.rel][1], check.actual)
    return found


def plan_push(out_dir: Path, *, repo_id: str | None, namespace: str | None, token: str | None,
              overwrite: bool) -> PushPlan:
    """Read the output and the remote repo (reads only) and decide what the push does."""
    from huggingface_hub import HfApi
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    manifest = read_manifest(out_dir)
    if manifest is None:
        raise QconvError(f"{out_dir}: no {MANIFEST_NAME}; only finished qconv outputs can be pushed")
    files = local_files(out_dir, manifest)
    endpoint = hub_endpoint()
    api = HfApi(endpoint=endpoint, token=token if token else False)
    if not repo_id:
        if not namespace:
            if token is None:
                raise QconvError("push: no token to find your user name; pass --repo-id or --namespace")
            namespace = api.whoami(token=token)["name"]
        repo_id = f"{namespace}/{default_repo_name(manifest)}"
    try:
        validate_repo_id(repo_id)
    except HFValidationError as exc:
        raise QconvError(f"--repo-id: {repo_id!r} is not a valid Hub repo id ({exc})") from None
    if repo_id.count("/") != 1:
        raise QconvError(f"--repo-id: {repo_id!r} must be <namespace>/<name>")

    source, revision = describe_source(manifest)
    settings = manifest.settings
    plan = PushPlan(
        repo_id=repo_id,
        endpoint=endpoint,
        files=files,
        commit_message=f"Convert {source}@{revision} to bnb 4-bit {settings.get('quant_type', 'nf4')} "
                       f"(qconv {manifest.qconv_version or 'unknown'})",
        commit_description=(f"source: {source}\nrevision: {revision}\nqconv: {manifest.qconv_version}\n"
                            f"settings: {settings}\nfiles: {len(files)}, {_human(sum(f[1] for f in files.values()))}"),
    )
    _compare_with_remote(plan, api, manifest, overwrite)
    return plan


def _compare_with_remote(plan: PushPlan, api, manifest: Manifest, overwrite: bool) -> None:
    """Fill ``exists/identical/parent_commit/deletions``; refuse other content unless ``overwrite``."""
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        info = api.model_info(plan.repo_id)
    except RepositoryNotFoundError:
        return
    plan.exists, plan.parent_commit, plan.private = True, info.sha, bool(info.private)
    remote = {s.rfilename for s in info.siblings or []} - HUB_HOUSEKEEPING
    if not remote:
        return  # an empty repo (e.g. created by an interrupted push)
    remote_manifest = _remote_manifest(api, plan.repo_id, info.sha) if MANIFEST_NAME in remote else None
    plan.identical = remote_manifest is not None and remote_manifest.files == manifest.files
    if not plan.identical and not overwrite:
        if remote_manifest is None:
            why = "it is not a qconv output (no qconv_manifest.json)"
        else:
            differ = sorted(set(remote_manifest.files.items()) ^ set(manifest.files.items()))
            names = sorted({name for name, _ in differ})
            why = f"{len(names)} file(s) differ, e.g. {', '.join(names[:3])}"
        raise QconvError(f"{plan.repo_id} already exists on the Hub with different content ({why}); "
                         "pass --overwrite to replace it, or choose another --repo-id")
    if overwrite:
        plan.deletions = sorted(remote - set(plan.files))


def _remote_manifest(api, repo_id: str, revision: str) -> Manifest | None:
    """The manifest stored in the remote repo at ``revision`` (None when it cannot be read)."""
    with tempfile.TemporaryDirectory(prefix="qconv-push-") as tmp:
        api.hf_hub_download(repo_id, MANIFEST_NAME, revision=revision, local_dir=tmp)
        try:
            return read_manifest(tmp)
        except QconvError as exc:
            logger.warning("%s: the remote %s is unreadable (%s)", repo_id, MANIFEST_NAME, exc)
            return None


def _upload(plan: PushPlan, *, private: bool, token: str) -> None:
    """Create the repo if needed, then one commit (large files pre-uploaded, skipped when already there)."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    api = HfApi(endpoint=plan.endpoint, token=token)
    if not plan.exists:
        api.create_repo(plan.repo_id, private=private, exist_ok=True)
        logger.info("created %s/%s%s", plan.endpoint, plan.repo_id, " (private)" if private else "")
    elif private and not plan.private:
        logger.warning("%s already exists and is public; --private does not change an existing repo", plan.repo_id)
    operations = []
    for rel, (path, _, sha256) in sorted(plan.files.items()):
        op = CommitOperationAdd(path_in_repo=rel, path_or_fileobj=str(path))
        if sha256:
            op.upload_info.sha256 = bytes.fromhex(sha256)  # verified above; spares a second read
        operations.append(op)
    operations += [CommitOperationDelete(path_in_repo=rel) for rel in plan.deletions]
    logger.info("uploading %d files (%s) to %s", len(plan.files), _human(plan.total_bytes), plan.repo_id)
    info = api.create_commit(
        plan.repo_id,
        operations,
        commit_message=plan.commit_message,
        commit_description=plan.commit_description,
        parent_commit=plan.parent_commit,
    )
    logger.info("pushed %s at commit %s", plan.repo_id, info.oid)


class _hub_errors:
    """Turn huggingface_hub / network failures into one-line QconvErrors (never showing the token)."""

    def __init__(self, where: str, token: str | None):
        self.where, self.token = where, token

    def __enter__(self):
        return self

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc is None or isinstance(exc, QconvError) or not isinstance(exc, Exception):
            return False
        mapped = _map_error(exc, self.where)
        if mapped is None:
            return False
        message = str(mapped)
        if self.token:
            message = message.replace(self.token, "***")
        raise QconvError(message) from None


def _map_error(exc: BaseException, where: str) -> QconvError | None:
    chain = _chain(exc)
    status = next((getattr(e.response, "status_code", None) for e in chain if getattr(e, "response", None) is not None), None)
    names = {cls.__name__ for e in chain for cls in type(e).__mro__}
    if names & _NETWORK_ERRORS:
        return QconvError(f"push to {where}: cannot reach the Hub at {hub_endpoint()} ({type(exc).__name__}); "
                          "check the network or HF_ENDPOINT, then re-run to resume")
    if status == 401 or "LocalTokenNotFoundError" in names:
        return QconvError(f"push to {where}: the Hub rejected the token (HTTP 401); check --token / HF_TOKEN")
    if status == 403:
        return QconvError(f"push to {where}: no write access with this token (HTTP 403); check the namespace "
                          "and that the token has write permission")
    if status == 412:
        return QconvError(f"push to {where}: the repo changed while pushing (HTTP 412); re-run to retry")
    if status is not None or any(_raised_in_hub_client(e) for e in chain):
        detail = "; ".join(dict.fromkeys((str(e).strip().splitlines() or [type(e).__name__])[0] for e in chain))
        return QconvError(f"push to {where} failed ({detail}); re-run the same command to resume")
    return None


_NETWORK_ERRORS = frozenset({"ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError", "ConnectionError",
                             "ConnectionRefusedError", "RemoteProtocolError", "ReadTimeout", "WriteError"})


def _raised_in_hub_client(exc: BaseException) -> bool:
    """True when ``exc`` comes from huggingface_hub or its HTTP stack (not from a bug of ours)."""
    if type(exc).__module__.startswith(("huggingface_hub", "httpx", "requests", "hf_xet")):
        return True
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    filename = tb.tb_frame.f_code.co_filename if tb is not None else ""
    return any(part in filename for part in ("huggingface_hub", "httpx", "hf_xet"))


def _chain(exc: BaseException) -> list[BaseException]:
    """``exc`` and its causes/contexts, outermost first."""
    out: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in out and len(out) < 10:
        out.append(current)
        current = current.__cause__ or current.__context__
    return out


def _human(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"  # pragma: no cover
