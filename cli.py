"""python cli.py COMMAND: the device CA from the command line (the seed's `node cli COMMAND`).

Every command takes --json for machine-readable output (after the command, or before it). A command
never shows a traceback: a usage error (an unknown option, a missing or malformed value) exits with status
2 and one line on stderr, anything else that goes wrong with status 1 and one line. Options are checked,
with the rules the HTTP API uses (shared/parameters.py), and output paths are checked too, before anything
is done.
"""

import argparse
import base64
import contextlib
import getpass
import json
import logging
import os
import secrets
import shlex
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from shared import parameters
from shared.bootstrap import LOCAL_FACTORY
from shared.composition import build_service
from shared.dps import device_registration
from shared.errors import CaError, NotFound, shown_to_callers, unexpected
from shared.jsonlines import is_batch_object, read_batch_object, read_json_lines, wide_encoding
from shared.ledger.models import CA_ACTIVE, CERT_REVOKED, CERT_STATUSES, FACTORY, CaRecord, CertificateQuery
from shared.pki import CA_CURVES, PkiError, ca_name, check_ca_id, check_device_id, check_verification_code
from shared.pki.csr_encoding import unwrap_csr
from shared.pki.revocation import REVOCATION_REASONS, revocation_reason
from shared.queues import InProcessQueue
from shared.serve_limits import (
    MAX_CONNECTIONS,
    MAX_HEADER_BYTES,
    MAX_REQUEST_TIMEOUT,
    MIN_HEADER_BYTES,
    ConnectionLimits,
)
from shared.service import DeviceCA, IssuedCertificate, check_backup_destination
from shared.service.access import KEY_PREFIX, NewApiKey, application_id, check_principal_name, split_api_key
from shared.service.common import normalize_serial
from shared.views import (
    api_key_view,
    batch_result_view,
    ca_view,
    certificate_view,
    new_api_key_view,
    principal_view,
    revocation_view,
)

EXIT_ERROR = 1
EXIT_USAGE = 2  # argparse's status for a command line it cannot take
EXIT_INTERRUPTED = 130  # 128 + SIGINT, as shells report it
EXIT_EXPIRING = 3  # check-expiring: something is inside its threshold (a pipeline's gate)
EXIT_ITEMS_FAILED = 4  # sign-batch: the batch ran, and some of its items failed (their errors are in the results)
MAX_WORKERS = 64

Handler = Callable[[DeviceCA, argparse.Namespace], tuple[Any, str | None]]


class UsageError(Exception):
    """The command line cannot be taken as it is (argparse's errors, raised instead of printed); `code` is
    the broken rule's error code when a value broke one (--json says it), else "usage"."""

    def __init__(self, message: str, code: str = "usage") -> None:
        super().__init__(message)
        self.code = code


class _RuleBroken(argparse.ArgumentTypeError):
    """A value that breaks the service's rule for it (raised by `_checked` types), with the rule's code."""

    def __init__(self, message: str, code: str) -> None:
        super().__init__(message)
        self.code = code


class OutputClosed(Exception):
    """Standard output was closed by its reader (`| head -1`): the command ends quietly."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # argparse raises its ArgumentError while handling the type's error, so the rule's code is its context
        handled = sys.exc_info()[1]
        broken = handled.__context__ if handled is not None else None
        code = broken.code if isinstance(broken, _RuleBroken) else "usage"
        raise UsageError(f"{message} (see '{self.prog} --help')", code)

    def print_help(self, file: Any = None) -> None:
        """--help on standard output, ending quietly (OutputClosed) when its reader has gone."""
        if file is not None:
            super().print_help(file)
        else:
            _emit(self.format_help().rstrip("\n"))


def main(argv: list[str] | None = None) -> int:
    """Run one command; returns the exit status (0, 1 for an error, 2 for a usage error, 3 and 4 for
    check-expiring's and sign-batch's findings, 130 for Ctrl-C)."""
    argv = sys.argv[1:] if argv is None else argv
    try:
        args = build_parser().parse_args(argv)
        args.json = getattr(args, "json", False) or args.json_first
    except UsageError as error:
        return _fail(argparse.Namespace(json="--json" in argv), error.code, str(error), EXIT_USAGE)
    except OutputClosed:  # --help, read by something that stopped reading
        return EXIT_ERROR
    if not getattr(args, "handler", None):
        return _fail(args, "usage", "name a command ('python cli.py --help' lists them)", EXIT_USAGE)
    _log_to_stderr(tracebacks=args.handler is serve or bool(os.environ.get("PKI_DEBUG")))
    try:
        _prepare(args)  # options and output paths, before anything is built or written
        service = build_service()
        try:
            document, text = args.handler(service, args)
        finally:
            service.close()
        if text is not None:  # None: the command printed as it went (serve)
            _emit(json.dumps(document, indent=2, sort_keys=False) if args.json else text)
        if getattr(args, "exit_status", 0):  # a command whose answer is also its status (check-expiring)
            return args.exit_status
    except OutputClosed:
        return EXIT_ERROR
    except KeyboardInterrupt:
        return _fail(args, "interrupted", "interrupted", EXIT_INTERRUPTED)
    except (CaError, PkiError) as error:
        return _fail(args, error.code, _for_this_command(args, error.code, error.message) + _which_ca(error.code))
    except OSError as error:
        return _fail(args, "os-error", _os_error(error))
    except Exception as error:  # the operator gets one line; the error ID finds the details in the log
        return _fail(args, "internal-error", unexpected(error, f"running {args.handler.__name__}").message)
    return 0


def _for_this_command(args: argparse.Namespace, code: str, message: str) -> str:
    """The service's words for an error, in this command's terms: with --factory, the caller the service
    calls "this caller" is that factory."""
    factory = getattr(args, "factory", None)
    if code == "intermediate-not-allowed" and factory is not None:
        return (
            message.replace("this caller", f"factory {factory!r}", 1)
            + " (list-factories shows the intermediates each factory may sign with)"
        )
    return message


def _which_ca(code: str) -> str:
    """For "there is no CA here" errors: which CA this command read, since PKI_HOME is relative to the
    current folder and a command run elsewhere finds an empty one."""
    if code not in ("root-not-found", "no-active-intermediate", "intermediate-not-found", "ca-not-found"):
        return ""
    from shared.config import Settings

    settings = Settings.load()
    if settings.ledger_tables:
        return f" (the CA in Table Storage, tables {settings.ledger_table_prefix}*)"
    return f" (the CA under PKI_HOME={settings.pki_home.resolve()})"


class _Stderr(logging.StreamHandler):
    """A log handler on whatever sys.stderr is when a record is written."""

    @property  # type: ignore[override]
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


class _OneLine(logging.Formatter):
    """A log record as one line, without its traceback (the line carries the error ID)."""

    def format(self, record: logging.LogRecord) -> str:
        record.exc_info = record.exc_text = None
        return super().format(record)


def _log_to_stderr(tracebacks: bool) -> None:
    """The service's log on stderr: one line a record for commands; `serve` and PKI_DEBUG=1 keep tracebacks.
    A command leaves out the records of failures that its own error line reports (it names their ID)."""
    handler = _Stderr()
    formatter_class = logging.Formatter if tracebacks else _OneLine
    handler.setFormatter(formatter_class("%(levelname)s: %(message)s"))
    if not tracebacks:
        handler.addFilter(lambda record: not hasattr(record, "error_id"))
    logger = logging.getLogger("device_ca")
    logger.handlers = [handler]
    logger.propagate = False
    # DefaultAzureCredential logs each credential it tried; the command's one error line says what failed
    logging.getLogger("azure.identity").setLevel(logging.ERROR)


def _fail(args: argparse.Namespace, code: str, message: str, status: int = EXIT_ERROR) -> int:
    one_line = shown_to_callers(" ".join(str(message).split()))
    if code == "internal-error" and not os.environ.get("PKI_DEBUG"):
        one_line += " (PKI_DEBUG=1 shows the details)"
    try:
        if getattr(args, "json", False):
            _emit(json.dumps({"error": {"code": code, "message": one_line}}))
    except OutputClosed:
        pass
    print(f"error: {one_line}", file=sys.stderr)
    return status


def _emit(text: str) -> None:
    """Print to standard output; OutputClosed when its reader has gone (the rest is dropped quietly)."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        _drop_stdout()
        raise OutputClosed from None


def _drop_stdout() -> None:
    """Point standard output at /dev/null, so that the interpreter's last flush does not fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _os_error(error: OSError) -> str:
    where = f"{error.filename}: " if error.filename else ""
    return f"{where}{error.strerror or error}"


# -- checks before anything is done -------------------------------------------------------------------


def _prepare(args: argparse.Namespace) -> None:
    """Check what can be checked before the service is built: the input file is read, and every output
    path can be written (CaError "cannot-write" otherwise), so that a command that would fail at its end
    does nothing at all. Folders are not made, except the device bundle's own (and ./devices for it) and
    sign-batch's --pem-dir (whose parent must exist)."""
    if args.handler is serve:
        from shared.api.workers import listening_port

        try:
            args.port = listening_port(args.host, args.port)  # a port in use is refused before anything is set up
        except CaError as error:
            if error.code != "port-in-use":
                raise
            hint = "; pick another with --port N (make run: PORT=N make run), or stop what listens there"
            raise CaError(error.message + hint, error.code) from None
    if args.handler is sign_csr:
        args.csr = _read_input(args.file)
    if args.handler is sign_batch:
        args.items, args.lines, named = _read_batch_input(args.source)
        if named is not None and args.intermediate not in (None, named):
            raise CaError(
                f"{args.source} names intermediate {named!r} (intermediateId) and --intermediate names "
                f"{args.intermediate!r}; leave out one of them",
                "conflicting-parameters",
            )
        args.intermediate = args.intermediate or named
        if args.results is None:
            stem = args.source.name.removesuffix(".jsonl").removesuffix(".json")
            args.results = args.source.with_name(stem + ".results.jsonl")
        _check_results_apart(args.source, args.results)
        _check_output_file(args.results)
        if args.pem_dir is not None:
            if args.source.is_dir() and args.pem_dir.resolve() == args.source.resolve():
                raise CaError(
                    f"--pem-dir {args.pem_dir} is the folder of CSR files: the chains written there as "
                    "DEVICE_ID.pem would be read as CSRs by the next run; name another folder",
                    "conflicting-parameters",
                )
            _check_output_folder(args.pem_dir, (), parents=False)
            args.pem_dir.mkdir(exist_ok=True)
    if args.handler is proof_ca_root_possession and args.verification_code is not None:
        args.out = args.out or Path(f"verification-{args.verification_code}.pem")
    elif args.handler is proof_ca_root_possession and args.out is None:
        _check_writable_folder(Path("."), Path("verification-CODE.pem"))  # DPS names the code
    if getattr(args, "out", None) is not None:
        _check_output_file(args.out)
    if args.handler is backup:
        check_backup_destination(args.destination)
    if args.handler is create_device_cert:
        if args.out_dir is None:
            device_id = args.device_id or f"device-{secrets.token_hex(6)}"
            args.device_id, args.out_dir, parents = device_id, Path("devices") / device_id, True
        else:
            parents = False
        _check_output_folder(args.out_dir, DEVICE_BUNDLE_FILES, parents)


def _read_input(path: Path) -> bytes:
    if str(path) == "-":
        return sys.stdin.buffer.read()
    if path.is_dir():
        raise CaError(f"cannot read {path}: it is a folder, not a CSR file", "cannot-read")
    return path.read_bytes()


def _check_results_apart(source: Path, results: Path) -> None:
    """sign-batch's results file must not be its input (appending results to it spoils the next run's
    input), nor a CSR file in its input folder (the next run would read it as a device's CSR)."""
    target, origin = results.resolve(), source.resolve()
    inside = source.is_dir() and target.parent == origin and target.suffix.lower() in CSR_SUFFIXES
    if target == origin or inside:
        raise CaError(
            f"cannot write the results to {results}: it is {'the input' if target == origin else 'in the input folder'}"
            "; name another file with --results",
            "cannot-write",
        )


def _check_output_file(path: Path) -> None:
    if path.is_dir():
        raise CaError(f"cannot write {path}: it is a folder (name a file)", "cannot-write")
    _check_writable_folder(path.parent, path)
    if path.exists() and not os.access(path, os.W_OK):
        raise CaError(f"cannot write {path}: permission denied", "cannot-write")


def _check_output_folder(folder: Path, names: tuple[str, ...], parents: bool) -> None:
    if folder.exists():
        if not folder.is_dir():
            raise CaError(f"cannot write into {folder}: it is a file, not a folder", "cannot-write")
        for name in names:
            _check_output_file(folder / name)
        return
    parent = folder.parent
    if parents:
        while not parent.exists() and parent != parent.parent:
            parent = parent.parent
    _check_writable_folder(parent, folder)


def _check_writable_folder(folder: Path, target: Path) -> None:
    if not folder.exists():
        raise CaError(f"cannot write {target}: folder {folder} does not exist", "cannot-write")
    if not folder.is_dir():
        raise CaError(f"cannot write {target}: {folder} is not a folder", "cannot-write")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise CaError(f"cannot write {target}: permission denied in {folder}", "cannot-write")


# -- commands ----------------------------------------------------------------------------------------


def create_ca_root(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    result = service.create_root(args.common_name, args.organization, args.curve, args.days)
    _write_if_asked(args.out, result.record.certificate_pem)
    record = result.record
    lines = [f"Created the CA root {record.common_name!r} ({record.curve}, serial {record.serial}).", _valid(record)]
    lines += _written(args.out, "root certificate") + [f"warning: {w}" for w in result.warnings]
    if record.dps.get("state") == "uploaded":
        lines.append("Uploaded the root to DPS; prove possession next: proof-ca-root-possession.")
    return ca_view(record, result.warnings), "\n".join(lines)


def show_ca_root(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    record = service.root()
    _write_if_asked(args.out, record.certificate_pem)
    if args.out:
        return ca_view(record), "\n".join([_describe_ca(record), *_written(args.out, "certificate")])
    return ca_view(record), record.certificate_pem.rstrip()


def proof_ca_root_possession(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    proof = service.prove_root_possession(args.verification_code, args.verified_on_upload)
    if proof.certificate_pem is None:  # verified on upload, or verified before: no certificate was made
        if proof.already_verified:
            line = "The root is already verified in DPS; nothing was changed."
        else:
            line = "Uploaded the root to DPS marked verified (verified on upload)."
        return {"verificationCode": None, "certificate": None, "file": None, "dps": proof.dps}, line
    out = args.out or Path(f"verification-{proof.verification_code}.pem")  # DPS named the code
    _write_if_asked(out, proof.certificate_pem)
    document = {
        "verificationCode": proof.verification_code,
        "certificate": proof.certificate_pem,
        "file": str(out),
        "dps": proof.dps,
    }
    lines = [
        f"Signed the verification certificate (CN={proof.verification_code}) with the root key.",
        *_written(out, "it"),
    ]
    lines += _dps_note(proof.dps)
    if proof.dps.get("isVerified"):
        lines.append("DPS verified the root: proof of possession is done.")
    if proof.dps.get("mode") == "offline":
        lines.append("Upload this file as the verification certificate of the root in the DPS portal.")
    return document, "\n".join(lines)


def create_ca_intermediate(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    result = service.create_intermediate(args.id, args.common_name, args.organization, args.curve, args.days)
    record = result.record
    _write_if_asked(args.out, record.certificate_pem)
    lines = [
        f"Created intermediate {record.id} {record.common_name!r} ({record.curve}, serial {record.serial}).",
        _valid(record),
        *_written(args.out, "intermediate certificate"),
        *[f"warning: {w}" for w in result.warnings],
    ]
    if record.dps.get("state") == "registered":
        lines.append(f"Registered in DPS as enrollment group {record.id} ({record.dps.get('provisioningStatus')}).")
    return ca_view(record, result.warnings), "\n".join(lines)


def list_intermediates(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    records = service.intermediates()
    default = next((r.id for r in reversed(records) if r.status == "active"), None)
    document = [{**ca_view(r), "default": r.id == default} for r in records]
    if not records:
        return document, "No intermediates yet; create one with create-ca-intermediate."
    rows = [("ID", "STATUS", "CURVE", "NOT AFTER", "DPS", "COMMON NAME")]
    for r in records:
        mark = " (default)" if r.id == default else ""
        dps = r.dps.get("state") or r.dps.get("mode") or "-"
        rows.append((r.id, r.status + mark, r.curve, _day(r.not_after), dps, r.common_name))
    return document, _table(rows)


def enable_intermediate(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    return _set_enabled(service, args.id, True)


def disable_intermediate(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    return _set_enabled(service, args.id, False)


def _set_enabled(service: DeviceCA, ca_id: str, enabled: bool) -> tuple[Any, str]:
    already = (service.intermediate(ca_id).status == CA_ACTIVE) == enabled  # asking again changes nothing
    result = service.set_intermediate_enabled(ca_id, enabled)
    verb = "Enabled" if enabled else "Disabled"
    headline = f"Intermediate {ca_id} was already {verb.lower()}." if already else f"{verb} intermediate {ca_id}."
    lines = [headline, *[f"warning: {w}" for w in result.warnings]]
    return ca_view(result.record, result.warnings), "\n".join(lines)


def retry_dps(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    record, notes = service.retry_dps(args.id)
    state = record.dps.get("state") or record.dps.get("mode", "unknown")
    lines = [f"Intermediate {args.id}: DPS state {state}.", *[f"warning: {note}" for note in notes]]
    if state == "failed":  # the command did not do what it was run for: a script must see it
        args.exit_status = EXIT_ERROR
    return ca_view(record, notes), "\n".join(lines)


def create_device_cert(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    """The seed's simulator flow: key and CSR made here, signed by the CA, written as a device bundle."""
    device_id = args.device_id  # _prepare gave it a random one if none was named
    key = ec.generate_private_key(CA_CURVES[args.curve])
    subject = x509.Name([x509.NameAttribute(x509.NameOID.COMMON_NAME, device_id)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    issued = service.sign_csr(
        csr.public_bytes(serialization.Encoding.PEM),
        device_id,
        intermediate_id=args.intermediate,
        renew=args.renew,
        **_signer(service, args),
    )
    files = _write_device_bundle(args.out_dir, key, issued)
    lines = [_describe_issued(issued), *(f"wrote {name}: {path}" for name, path in files.items())]
    lines += [f"warning: {w}" for w in issued.warnings]
    return {**issued.bundle(), "files": {k: str(v) for k, v in files.items()}}, "\n".join(lines)


def sign_csr(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    source = "standard input" if str(args.file) == "-" else str(args.file)
    try:
        issued = service.sign_csr(
            args.csr, args.device_id, intermediate_id=args.intermediate, renew=args.renew, **_signer(service, args)
        )
    except CaError as error:
        if error.message.startswith("the body "):  # the CSR parser speaks of a request body; here it is a file
            raise CaError(source + error.message.removeprefix("the body"), error.code) from None
        raise
    _write_if_asked(args.out, issued.chain_pem)
    lines = [_describe_issued(issued), *_written(args.out, "certificate chain (device, intermediate)")]
    lines += [f"warning: {w}" for w in issued.warnings]
    if not args.out:
        lines.append(issued.chain_pem.rstrip())
    return issued.bundle(), "\n".join(lines)


def list_certificates(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    expiring = service.expiring_before(args.expiring_within_days) if args.expiring_within_days is not None else None
    page = service.certificates(
        CertificateQuery(
            device_id=args.device_id,
            intermediate_id=args.intermediate,
            status=args.status,
            expiring_before=expiring,
            requested_by=args.requested_by,
            limit=args.limit,
            cursor=args.cursor,
        )
    )
    document = {"items": [certificate_view(c) for c in page.items], "nextCursor": page.next_cursor}
    if not page.items:
        return document, "No certificates match."
    rows = [("SERIAL", "DEVICE", "INTERMEDIATE", "STATUS", "NOT AFTER")]
    rows += [(c.serial, c.device_id, c.intermediate_id, c.status, _day(c.not_after)) for c in page.items]
    text = _table(rows)
    if page.next_cursor:
        text += f"\nMore: --cursor {page.next_cursor}"
    return document, text


def check_expiring(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    report = service.scan_expiring(within_days=args.within, announce=args.announce)
    t = report.thresholds
    limits = f"devices {t.device:g}, intermediates {t.intermediate:g}, root {t.root:g} days"
    if report.expiring:
        args.exit_status = EXIT_EXPIRING
    elif report.failures:  # a scan that could not look everywhere must not pass a pipeline's gate
        args.exit_status = EXIT_ERROR
    if not report.findings:
        lines = [f"Nothing expires within the thresholds ({limits})."]
    else:
        rows = [("KIND", "ID", "SERIAL", "NOT AFTER", "DAYS LEFT", "STAGE")]
        rows += [
            (f.kind, f.subject, f.serial, _day(f.not_after), f"{f.days_left:g}", f.stage + (" (new)" * f.announced))
            for f in report.findings
        ]
        lines = [f"{len(report.findings)} certificate(s) inside the thresholds ({limits}):", _table(rows)]
        lines += [f"{f.kind} {f.subject}: {f.detail}" for f in report.findings if f.detail]
        lines += [f"{f.kind} {f.subject}: {f.action}" for f in report.findings if f.action and f.kind != "device"]
    if args.announce:
        lines.append(f"Announced {len(report.announced)} new stage(s).")
    lines += [f"warning: {failure}" for failure in report.failures]
    if report.failures:
        lines.append("What failed above is tried again by the next scan (or run this command again).")
    return report.view(), "\n".join(lines)


def revoke(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    already = service.certificate(args.serial).status == CERT_REVOKED  # revoking again changes nothing
    revocation, dps_state = service.revoke(args.serial, args.reason)
    record = revocation.record
    if already:
        lines = [
            f"Certificate {record.serial} of device {record.device_id} was already revoked "
            f"({record.status_reason}); the ledger is unchanged."
        ]
        lines += [f"{other.serial} was revoked with it: it holds the same key." for other in revocation.also_revoked]
    else:
        lines = [f"Revoked certificate {record.serial} of device {record.device_id} ({record.status_reason})."]
        lines += [f"Also revoked {other.serial}: it holds the same key." for other in revocation.also_revoked]
    lines += _dps_note(dps_state)
    return revocation_view(revocation, dps_state), "\n".join(lines)


def create_factory(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    issued = service.principals.create_factory(args.name, args.intermediate, args.app_id)
    return _new_key(issued, f"Created factory {args.name}, bound to {', '.join(issued.principal.intermediates)}.")


def bind_factory(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    before = service.principals.principal(args.name).intermediates
    factory = service.principals.bind_factory(args.name, args.intermediate)
    text = f"Factory {args.name} now signs with {', '.join(factory.intermediates)} (before: {', '.join(before)})."
    return principal_view(factory), text + " Its API keys are unchanged."


def list_factories(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    factories = service.principals.factories()
    if not factories:
        return [], "No factories yet; create one with create-factory."
    rows = [("FACTORY", "INTERMEDIATES", "APP ID", "CREATED")]
    rows += [(f.id, ",".join(f.intermediates), f.app_id or "", _day(f.created_at)) for f in factories]
    return [principal_view(f) for f in factories], _table(rows)


def create_admin_key(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    issued = service.principals.create_admin_key(args.name)
    return _new_key(issued, f"Created an API key for admin {args.name}.")


def create_api_key(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    issued = service.principals.create_api_key(args.principal)
    return _new_key(issued, f"Created another API key for {issued.principal.role} {args.principal}.")


def _new_key(issued: NewApiKey, headline: str) -> tuple[Any, str]:
    lines = [
        headline,
        f"API key (ID {issued.key.id}), shown this once; only its hash is kept:",
        f"  {issued.secret}",
        "Send it as 'Authorization: Bearer <key>' or 'x-api-key: <key>'.",
    ]
    return new_api_key_view(issued), "\n".join(lines)


def revoke_key(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    before = service.ledger.get_api_key(args.key_id)  # revoking again changes nothing
    key = service.principals.revoke_api_key(args.key_id)
    if before is not None and before.revoked_at is not None:
        text = f"API key {key.id} of {key.principal_id} was already revoked ({_day(key.revoked_at)})"
        return api_key_view(key), text + "; nothing was changed."
    return api_key_view(key), f"Revoked API key {key.id} of {key.principal_id}."


def list_keys(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    keys = service.principals.api_keys()
    if not keys:
        return [], "No API keys yet; create them with create-admin-key and create-factory."
    rows = [("KEY ID", "PRINCIPAL", "CREATED", "REVOKED")]
    rows += [(k.id, k.principal_id, _day(k.created_at), _day(k.revoked_at) if k.revoked_at else "") for k in keys]
    return [api_key_view(k) for k in keys], _table(rows)


def backup(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    done = service.backup(args.destination)
    lines = [f"Backed up the CA to {done.destination}:", *(f"  {part}" for part in done.contents)]
    lines.append(f"To restore it, point PKI_HOME at it: PKI_HOME={done.destination} python cli.py ...")
    document = {
        "destination": str(done.destination),
        "cas": done.cas,
        "certificates": done.certificates,
        "contents": list(done.contents),
    }
    return document, "\n".join(lines)


def serve(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str | None]:
    """Run the HTTP API with uvicorn; with --bootstrap, set up an empty PKI home first."""
    import uvicorn

    from shared.api import create_app
    from shared.api.connections import bounded_protocol
    from shared.api.workers import serve_workers
    from shared.bootstrap import bootstrap_local

    setup = bootstrap_local(service) if args.bootstrap else None
    banner = _serve_banner(service, args, setup, _write_root_file(service))
    _emit(json.dumps(banner[0], indent=2) if args.json else banner[1])
    if isinstance(service.batch_queue, InProcessQueue):  # the embedded queue was lost with the last process
        resumed = service.resume_batches()
        if resumed and not args.json:
            _emit(f"Batches: {resumed} unfinished chunk(s) queued again; this process signs them.")
    limits = ConnectionLimits(
        max_header_bytes=args.max_header_bytes,
        request_timeout=args.request_timeout,
        max_connections=args.max_connections,
    )
    if args.workers > 1:
        resume = _resume_after_a_worker(service) if isinstance(service.batch_queue, InProcessQueue) else None
        serve_workers(
            args.host, args.port, args.workers, args.log_level, args.access_log, limits=limits, on_replaced=resume
        )
    else:
        uvicorn.run(
            create_app(service),
            host=args.host,
            port=args.port,
            log_level=args.log_level,
            access_log=args.access_log,
            http=bounded_protocol(limits),
            ws="none",  # the API has no WebSocket routes: an upgrade request is an ordinary request
        )
    return None, None


def _resume_after_a_worker(service: DeviceCA) -> Callable[[], int]:
    """What `serve --workers` does when a worker died: the chunks queued in its memory died with it, so every
    unfinished chunk is queued again on this (the parent) process's in-process queue, which signs them. A
    chunk a living worker still holds is then delivered twice, harmlessly (`resume_batches`)."""

    def resume() -> int:
        resumed = service.resume_batches(last_first=True)
        if resumed:
            logging.getLogger("device_ca.serve").warning(
                "Batches: %d unfinished chunk(s) queued again after a worker was replaced; this process signs them",
                resumed,
            )
        return resumed

    return resume


def _where_state_lives(service: DeviceCA, home: Path) -> str:
    """Where keys, ledger and offline DPS records are, for the first line `serve` prints."""
    health = service.backends()
    if health["ledger"]["backend"] == "sqlite" and health["keys"]["backend"] == "local":
        return f"keys, ledger and offline DPS under {home}"
    keys = f"keys under {home}" if health["keys"]["backend"] == "local" else f"keys in {health['keys'].get('vault')}"
    ledger = health["ledger"]
    if ledger["backend"] == "tables":
        return (
            f"{keys}; ledger and offline DPS in Table Storage ({ledger['endpoint']}, tables {ledger['tablePrefix']}*)"
        )
    return f"{keys}; ledger and offline DPS under {home}"


def try_it(base: str, device: str = "my-device-1") -> list[str]:
    """The README's "Try it" block: a device key (made once, so that the block can be run again and gets
    the same certificate back), its CSR, the CA's chain and the signed chain over HTTP with the factory key
    in $FACTORY_KEY, then `openssl verify`."""
    key = '-H "Authorization: Bearer $FACTORY_KEY"'
    pem = '-H "Accept: application/x-pem-file"'
    return [
        f"test -f {device}.key || openssl ecparam -name prime256v1 -genkey -noout -out {device}.key",
        f"openssl req -new -key {device}.key -subj /CN={device} -out {device}.csr",
        f"curl -sS --fail-with-body {key} {pem} -o device-ca-chain.pem {base}/api/ca/chain",
        f'curl -sS --fail-with-body {key} -H "Content-Type: application/pkcs10" {pem} --data-binary @{device}.csr '
        f"-o {device}.pem {base}/api/devices/{device}/certificate",
        f"openssl verify -CAfile device-ca-chain.pem {device}.pem",
    ]


def cli_command() -> str:
    """This CLI as a command that works as printed from the project folder, whether or not a virtual
    environment is activated: the interpreter running this process (relative when it is under the project,
    as `.venv/bin/python` is), then cli.py."""
    project = Path(os.path.abspath(__file__)).parent
    python = Path(os.path.abspath(sys.executable or "python"))  # not resolved: a venv's python is a symlink
    with contextlib.suppress(ValueError):
        python = python.relative_to(project)
    return f"{shlex.quote(str(python))} cli.py"


def _write_root_file(service: DeviceCA) -> Path | None:
    """PKI_HOME/root.pem written anew from the ledger's root, for tools that want the file (`curl --cacert`
    against an IoT Hub, `openssl verify`); None when there is no root yet, or when PKI_HOME is not a folder
    this process can write: with the keys in Key Vault and the ledger in Table Storage nothing else is kept
    on local disk, so PKI_HOME may not exist, and GET /api/ca/root serves the root instead."""
    if service.ledger.get_root() is None:
        return None
    path = (service.settings.pki_home / "root.pem").resolve()
    try:
        _write_file(path, service.root().certificate_pem.encode(), 0o644)
    except OSError:
        return None
    return path


def _serve_banner(
    service: DeviceCA, args: argparse.Namespace, setup: Any, root_file: Path | None
) -> tuple[dict[str, Any], str]:
    base = f"http://{args.host}:{args.port}"
    home = service.settings.pki_home
    example = ([f"export FACTORY_KEY={setup.factory.secret}"] if setup else []) + try_it(base)
    document: dict[str, Any] = {
        "url": base,
        "openapi": f"{base}/api/openapi.json",
        "docs": f"{base}/api/docs",
        "pkiHome": str(home),
        "backends": {part: backend["backend"] for part, backend in service.backends().items()},
        "rootCertificateFile": str(root_file) if root_file else None,
        "example": example,
    }
    lines = [
        f"Device CA: serving on {base} with {_where_state_lives(service, home)}",
        f"OpenAPI document: {base}/api/openapi.json   docs page: {base}/api/docs",
    ]
    if service.settings.storage_queues:
        lines.append(
            "Batches are queued on Storage (QUEUE_STORAGE) for the Functions host's queue functions to sign; "
            "this server does not sign them (unset QUEUE_STORAGE to have it do so)."
        )
    if setup:
        document["created"] = {
            "intermediateId": setup.intermediate_id,
            "admin": new_api_key_view(setup.admin),
            "factory": new_api_key_view(setup.factory),
        }
        lines += [
            "",
            f"First start: created the CA root, intermediate {setup.intermediate_id} and two API keys,",
            "shown this once (only their hashes are kept):",
            f"  admin key:   {setup.admin.secret}",
            f"  factory key: {setup.factory.secret}  (factory {setup.factory.principal.id})",
        ]
    elif args.bootstrap:
        lines += ["", *_key_advice(service)]
    if service.ledger.get_root() is not None:
        lines += [
            f"Root certificate: {root_file}"
            if root_file
            else f"Root certificate: {base}/api/ca/root (PKI_HOME {home} is not a folder this server can write)"
        ]
        lines += [
            "",
            "Try it: a device key and CSR, the CA's chain and the device's over HTTP, then verify (re-runnable):",
        ]
        if not setup:
            lines.append(f"First: export FACTORY_KEY=KEY, with {_key_source(service)}.")
        lines += [f"  {command}" for command in example]
    return document, "\n".join(lines)


def _advised_factory(service: DeviceCA) -> str | None:
    """The factory a later start's advice names: bootstrap's, or else the first; None when there is none."""
    factories = [factory.id for factory in service.principals.factories()]
    return LOCAL_FACTORY if LOCAL_FACTORY in factories else (factories[0] if factories else None)


def _key_advice(service: DeviceCA) -> list[str]:
    """On a later start: API keys were shown only when made, so how to get a new one for the factory there
    is, or how to make a factory."""
    cli, factory = cli_command(), _advised_factory(service)
    lines = ["Using the existing CA; API keys are shown only when made, so its keys are not shown again."]
    if factory is not None:
        lines.append(f"A new key for factory {factory}: {cli} create-api-key {factory}")
    else:
        lines.append(f"A factory with its key: {cli} create-factory NAME --intermediate ID")
    lines.append(f"An admin key: {cli} create-admin-key (list-keys lists the keys; revoke-key revokes one)")
    return lines


def _key_source(service: DeviceCA) -> str:
    """Where the key the "Try it" block reads from $FACTORY_KEY comes from, on a start that printed none."""
    factory, cli = _advised_factory(service), cli_command()
    if factory is None:
        return f"the key that {cli} create-factory NAME --intermediate ID prints"
    return f"a key of factory {factory} (the first start printed one; {cli} create-api-key {factory} makes another)"


# -- output helpers ----------------------------------------------------------------------------------


DEVICE_BUNDLE_FILES = ("device.key.pem", "device.cert.pem", "device.chain.pem", "bundle.json", "registration.json")


def _write_device_bundle(out_dir: Path, key: ec.EllipticCurvePrivateKey, issued: IssuedCertificate) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)  # _prepare checked where it goes
    files = dict(
        zip(
            ("key", "certificate", "chain", "bundle", "registration"),
            (out_dir / name for name in DEVICE_BUNDLE_FILES),
            strict=True,
        )
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    _write_file(files["key"], key_pem, 0o600)
    _write_file(files["certificate"], issued.record.certificate_pem.encode(), 0o644)
    _write_file(files["chain"], issued.chain_pem.encode(), 0o644)
    _write_file(files["bundle"], (json.dumps(issued.bundle(), indent=2) + "\n").encode(), 0o644)
    registration = device_registration(issued.record.device_id, issued.dps)
    _write_file(files["registration"], (json.dumps(registration, indent=2) + "\n").encode(), 0o644)
    return files


def _write_file(path: Path, data: bytes, mode: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
    finally:
        os.close(fd)


def _write_if_asked(path: Path | None, text: str) -> None:
    if path:
        _write_file(path, text.encode(), 0o644)  # _prepare checked that it can be written; no folders are made


def _written(path: Path | None, what: str) -> list[str]:
    return [f"wrote {what}: {path}"] if path else []


def _signer_options(sub: argparse.ArgumentParser) -> None:
    """--intermediate and --factory, as every signing command takes them."""
    sub.add_argument("--intermediate", type=CA_ID, help="intermediate ID to sign with (default: the newest active)")
    sub.add_argument(
        "--factory",
        type=PRINCIPAL,
        metavar="NAME",
        help="sign on behalf of this factory, by its rules: one of its intermediates, and the device becomes (or "
        "must already be) its own, so the factory can renew it over the API. Default: as this host's admin, "
        "whose devices no factory may certify afterwards",
    )


def _signer(service: DeviceCA, args: argparse.Namespace) -> dict[str, Any]:
    """Who a signing command signs as: the CLI's user (an admin: any intermediate, any device, owned by
    this host's admins), or with --factory that factory, by its rules (its intermediates, its devices)."""
    if getattr(args, "factory", None) is None:
        return {"requested_by": _who()}
    principal = service.ledger.get_principal(args.factory)
    if principal is None:
        raise NotFound(f"no factory called {args.factory!r} (list-factories lists them)", "principal-not-found")
    if principal.role != FACTORY:
        raise CaError(f"{args.factory!r} is an admin, not a factory; leave out --factory", "not-a-factory")
    return {"requested_by": principal.id, "allowed_intermediates": principal.intermediates}


def _who() -> str:
    try:
        return f"{parameters.CLI_REQUESTER}{getpass.getuser()}"
    except (KeyError, OSError):
        return "cli:unknown"  # a colon: no principal can be called this (principal names are [a-z0-9-])


def _describe_issued(issued: IssuedCertificate) -> str:
    record = issued.record
    verb = "Issued" if issued.created else "Already issued (same device, same key):"
    return (
        f"{verb} certificate {record.serial} for device {record.device_id} by intermediate "
        f"{record.intermediate_id}, valid {_day(record.not_before)} to {_day(record.not_after)}."
    )


def _describe_ca(record: CaRecord) -> str:
    what = "The CA root" if record.kind == "root" else f"Intermediate {record.id}"
    return f"{what} {record.common_name!r} ({record.curve}, serial {record.serial}, {record.status})."


def _dps_note(state: dict[str, Any]) -> list[str]:
    """What DPS was told, as the other commands' warnings say it (DPS offline: nothing was sent)."""
    return [f"warning: {state['message']}"] if state.get("message") else []


def _valid(record: CaRecord) -> str:
    return f"Valid {_day(record.not_before)} to {_day(record.not_after)}."


def _day(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d")


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows
    )


# -- sign-batch --------------------------------------------------------------------------------------

CSR_SUFFIXES = (".csr", ".pem")


def sign_batch(service: DeviceCA, args: argparse.Namespace) -> tuple[Any, str]:
    """Sign a file or folder of CSRs as batches on this host, chunk by chunk with the queue handler itself,
    with a progress bar; each finished chunk's results are appended to the results file (and chains written)
    before the next begins. Items whose device already has an "issued" line there are skipped, so a run
    after an interruption signs only the rest, and an item committed but not yet written gets its
    certificate back from the ledger (same CSR), never a second one."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from shared.service.batches import CHUNK_SIZE, MAX_BATCH_ITEMS, ChunkMessage

    signer = _signer(service, args)
    items, done = args.items, _issued_devices(args.results)
    remaining = [(n, item) for n, item in enumerate(items) if _device_of(item) not in done]
    counts = {"issued": 0, "created": 0, "failed": 0, "skipped": len(items) - len(remaining)}
    batch_ids: list[str] = []
    console = _stderr_console()  # a bar where stderr is a terminal (or FORCE_COLOR is set), else nothing
    progress = Progress(
        TextColumn("signing"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        disable=args.json or not console.is_terminal,
        console=console,
    )
    results = _Appender(args.results)
    with progress, results:
        task = progress.add_task("sign-batch", total=len(remaining))
        for start in range(0, len(remaining), MAX_BATCH_ITEMS):
            part = remaining[start : start + MAX_BATCH_ITEMS]
            batch = service.submit_batch(
                [item for _, item in part],
                intermediate_id=args.intermediate,
                enqueue=False,
                lines=[args.lines[n] for n, _ in part] if args.lines is not None else None,  # errors name lines
                **signer,
            )
            batch_ids.append(batch.record.id)
            try:
                for chunk in range(batch.record.chunks):
                    service.sign_batch_chunk(ChunkMessage(batchId=batch.record.id, chunk=chunk).text())
                    page = service.batch_results(batch.record.id, limit=CHUNK_SIZE, cursor=str(chunk * CHUNK_SIZE))
                    for result in page.results:
                        line = _result_line(part[result.index][0], args.lines, result)
                        counts[result.status] += 1
                        if result.issued is not None:
                            counts["created"] += result.issued.created
                            if args.pem_dir:
                                _write_file(
                                    args.pem_dir / f"{result.device_id}.pem", result.issued.chain_pem.encode(), 0o644
                                )
                        results.write(json.dumps(line) + "\n")
                    results.sync()
                    progress.advance(task, len(page.results))
            except BaseException:
                service.cancel_batch(batch.record.id, "the command signing it stopped; run it again to resume")
                raise
    document = {"batches": batch_ids, "results": str(args.results), **counts}
    lines = [
        f"Signed {counts['issued']} of {len(remaining)} item(s): {counts['created']} new, "
        f"{counts['issued'] - counts['created']} given back from the ledger (the same CSR); {counts['failed']} failed.",
        f"Results (one JSON line an item): {args.results}",
        f"Batch(es) in the ledger (GET /api/batches/ID): {', '.join(batch_ids) or 'none'}",
    ]
    if counts["skipped"]:
        lines.insert(1, f"Skipped {counts['skipped']} item(s) already issued in {args.results}.")
    if args.pem_dir:
        lines.append(f"Certificate chains (device, intermediate): {args.pem_dir}/DEVICE_ID.pem")
    if counts["failed"]:
        lines.append(
            "Failed items have an 'error' in the results. Running the command again tries them again: fix the "
            "items whose error is about the request (its CSR, its device ID) first."
        )
        args.exit_status = EXIT_ITEMS_FAILED
    return document, "\n".join(lines)


def _result_line(item: int, lines: list[int] | None, result: Any) -> dict[str, Any]:
    """One results-file line: the item's position in SOURCE (and its line in a JSON Lines file), then its
    result; an error's "item N:" prefix (its place in the batch, not in SOURCE) is left out. A JSON Lines
    item's error names its line instead, as POST /api/batches does."""
    view = batch_result_view(result)
    error = view.get("error")
    if error and error["message"].startswith(f"item {result.index}: "):
        view["error"] = {**error, "message": error["message"].split(": ", 1)[1]}
    located = {"item": item, "line": lines[item]} if lines is not None else {"item": item}
    return {**located, **view}


class _Appender:
    """A file appended to, opened at the first write (a command refused before then leaves no file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._file: Any = None

    def write(self, text: str) -> None:
        if self._file is None:
            torn = _ends_mid_line(self.path)  # a run killed while writing a line: the next line starts anew
            self._file = self.path.open("a", encoding="utf-8")
            if torn:
                self._file.write("\n")
        self._file.write(text)

    def sync(self) -> None:
        """What was written is on disk: an interruption after this loses none of it."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())

    def __enter__(self) -> "_Appender":
        return self

    def __exit__(self, *exc: object) -> None:
        if self._file is not None:
            self._file.close()


def _ends_mid_line(path: Path) -> bool:
    """Whether a file exists and its last byte is not a line feed."""
    try:
        with path.open("rb") as file:
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"
    except (FileNotFoundError, OSError):  # OSError: seeking before the start of an empty file
        return False


def _stderr_console() -> Any:
    from rich.console import Console

    return Console(stderr=True)


def _read_batch_input(source: Path) -> tuple[list[Any], list[int] | None, str | None]:
    """The items of SOURCE, each item's line number (None where items are not lines) and the intermediate the
    file names (None if none): a JSON Lines file (one {"deviceId", "csr"} a line, read as POST /api/batches
    reads its body: a line that is not JSON is that item's failure, named by its line), a JSON file of the
    API's JSON form ({"items": [...], "intermediateId"?}: items named by index, as the API names them), or a
    folder of CSR files named DEVICE_ID.csr or DEVICE_ID.pem (PEM or DER). CaError when it is none of these."""
    if source.is_dir():
        files = sorted(p for p in source.iterdir() if p.suffix.lower() in CSR_SUFFIXES and p.is_file())
        if not files:
            raise CaError(f"{source} holds no CSR files (*.csr or *.pem, named by device ID)", "cannot-read")
        # a file name that is not UTF-8 fails its item naming it as it can (U+FFFD for the bytes it cannot show)
        named = [(os.fsencode(path.stem).decode("utf-8", "replace"), path) for path in files]
        return [{"deviceId": stem, "csr": _csr_text(path.read_bytes())} for stem, path in named], None, None
    data = _read_input(source)
    wide = wide_encoding(data)
    if wide:
        raise CaError(
            f"{source} is {wide} text: save it as UTF-8 (PowerShell: Out-File -Encoding utf8, or Set-Content "
            "-Encoding utf8)",
            "cannot-read",
        )
    if is_batch_object(data):
        try:
            items, intermediate = read_batch_object(data)
        except CaError as error:  # its words speak of a request body; here it is a file
            words = error.message
            words = words.replace("the body", str(source)) if "the body" in words else f"{source}: {words}"
            raise CaError(words, error.code) from None
        if not items:
            raise CaError(f"{source} holds no items: a batch needs at least one", "empty-batch")
        return items, None, intermediate
    read = read_json_lines(data)
    if not read.items:  # the words and code POST /api/batches gives such a body
        raise CaError(f"a batch needs at least one item: every line of {source} is blank", "empty-batch")
    if not any(isinstance(item, dict) for item in read.items):
        raise CaError(
            f"{source} is not a JSON Lines file of items (one JSON object a line: deviceId, csr), nor a JSON "
            'object {"items": [...]}; for CSR files, name a folder of them',
            "cannot-read",
        )
    return read.items, read.lines, None


def _csr_text(data: bytes) -> str:
    """A CSR file's content as PEM text, read as POST /api/devices/{id}/certificate reads a body (shared/pki
    unwrap_csr: DER, PEM with text around it, a UTF-8 or UTF-16 byte-order mark, bare base64); a file that
    is none of these is passed on as it is, for its item to fail with the reason."""
    try:
        der, _ = unwrap_csr(data)
    except PkiError:
        if data.lstrip().startswith(b"-----BEGIN"):
            return data.decode("utf-8", errors="replace")
        der = data
    body = base64.encodebytes(der).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{body}-----END CERTIFICATE REQUEST-----\n"


def _device_of(item: Any) -> Any:
    return item.get("deviceId") if isinstance(item, dict) else None


def _issued_devices(results: Path) -> set[str]:
    """The devices that have an "issued" line in an earlier run's results file."""
    if not results.exists():
        return set()
    done = set()
    # bytes that are not UTF-8 (a damaged file) spoil only their own line
    for document in read_json_lines(results.read_bytes()).items:
        if isinstance(document, dict) and document.get("status") == "issued":
            done.add(document.get("deviceId"))
    return done


# -- parser ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python cli.py",
        description=(
            "A certificate authority for Azure IoT device fleets. Settings come from the environment or "
            "local.settings.json; with none, CA keys and the ledger live under ./.pki and DPS is offline. "
            "KEY_VAULT_URL moves CA keys to Key Vault, LEDGER_TABLES the ledger to Azure Table Storage."
        ),
        epilog=(
            "Run 'python cli.py COMMAND --help' for a command's options. Exit status: 0 done, 1 an error "
            "(one line on stderr), 2 a usage error (an unknown option, a missing or malformed value), 3 "
            "check-expiring found certificates inside their thresholds, 4 sign-batch ran but some items failed "
            "(their errors are in the results file), 130 interrupted (Ctrl-C)."
        ),
    )
    # before the command too (`python cli.py --json list-keys`); its own dest, since a subcommand's defaults
    # would overwrite the value parsed here
    parser.add_argument(
        "--json", dest="json_first", action="store_true", help="print machine-readable JSON (or after the command)"
    )
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")
    common = _Parser(add_help=False)
    common.add_argument("--json", action="store_true", help="print machine-readable JSON instead of text")

    def command(name: str, handler: Handler, help_text: str, description: str | None = None) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, parents=[common], help=help_text, description=description or help_text)
        sub.set_defaults(handler=handler)
        return sub

    def ca_options(sub: argparse.ArgumentParser, kind: str, default_days: str) -> None:
        sub.add_argument(
            "--common-name",
            type=_checked(_common_name),
            help=f"subject CN of the {kind}, 1-64 printable characters (default: from CA_NAME)",
        )
        sub.add_argument("--organization", type=_checked(_organization), help="subject O, if any (as the CN)")
        sub.add_argument(
            "--curve", choices=sorted(CA_CURVES), type=str.upper, help="key curve (default: CA_CURVE, P-256)"
        )
        sub.add_argument(
            "--days",
            type=_rule(parameters.days),
            help=f"validity in days, at most {parameters.MAX_DAYS} (default: {default_days})",
        )
        sub.add_argument(
            "--out", type=Path, help=f"also write the {kind} certificate (PEM) to this file (its folder must exist)"
        )

    def factory_options(sub: argparse.ArgumentParser, name_help: str) -> None:
        sub.add_argument("name", type=PRINCIPAL, help=name_help)
        sub.add_argument(
            "--intermediate",
            action="append",
            required=True,
            type=CA_ID,
            help="an intermediate it may sign with (repeatable)",
        )

    sub = command(
        "create-ca-root",
        create_ca_root,
        "create the CA root: its key in the key store, a self-signed certificate, registered with DPS",
    )
    ca_options(sub, "root", "ROOT_CERT_DAYS, 7300")

    sub = command("show-ca-root", show_ca_root, "print the CA root certificate (PEM)")
    sub.add_argument("--out", type=Path, help="write the root certificate to this file instead (its folder must exist)")

    sub = command(
        "proof-ca-root-possession",
        proof_ca_root_possession,
        "sign DPS's verification code with the root key (the verification certificate)",
        "Sign the verification certificate DPS asks for (CN = the verification code) with the root key. With "
        "DPS configured this is the whole round trip: the code is asked of DPS, the certificate sent back and "
        "the root verified; a root DPS already holds verified is left as it is. If DPS says the certificate "
        "is not within its validity period, check this machine's clock.",
    )
    sub.add_argument(
        "--verification-code",
        type=_checked(check_verification_code),
        help="the code DPS shows for the root certificate (needed when DPS is not configured; with DPS "
        "configured, a new code is asked of DPS when this is left out)",
    )
    sub.add_argument(
        "--verified-on-upload",
        action="store_true",
        help="upload the root marked verified instead (Microsoft's newer path); refused when DPS is not configured",
    )
    sub.add_argument("--out", type=Path, help="where to write it (default: ./verification-CODE.pem)")

    sub = command(
        "create-ca-intermediate",
        create_ca_intermediate,
        "create an intermediate signed by the root; it becomes the default for signing",
        "Create a CA intermediate signed by the root and register it with DPS as an enrollment group. "
        "The newest active intermediate is the default for signing device certificates.",
    )
    sub.add_argument("--id", type=CA_ID, help=f"intermediate ID: {CA_ID_RULE} (default: int-DATE-RANDOM)")
    ca_options(sub, "intermediate", "INTERMEDIATE_CERT_DAYS, 3650")

    command("list-intermediates", list_intermediates, "list the intermediates, newest last, and which is the default")

    sub = command("disable-intermediate", disable_intermediate, "stop signing with an intermediate (and its DPS group)")
    sub.add_argument("id", type=CA_ID, help="intermediate ID")
    sub = command("enable-intermediate", enable_intermediate, "resume signing with a disabled intermediate")
    sub.add_argument("id", type=CA_ID, help="intermediate ID")
    sub = command(
        "retry-dps",
        retry_dps,
        "register an intermediate's DPS enrollment group again (after its state is failed)",
        "Register an intermediate's enrollment group with DPS again: queued on the dps-registrations queue "
        "when QUEUE_STORAGE is set (state pending until the queue function has done it), else at once.",
    )
    sub.add_argument("id", type=CA_ID, help="intermediate ID")

    sub = command(
        "create-device-cert",
        create_device_cert,
        "make a device key and CSR here, sign it, and write the device bundle (the seed's simulator flow)",
        "Make a device key (kept on this machine) and a CSR, have the CA sign it, and write a device bundle: "
        "device.key.pem (mode 0600), device.cert.pem, device.chain.pem (device then intermediate), bundle.json "
        "and registration.json (registration ID, DPS endpoint and ID scope). Real factories keep the key on the "
        "device and use sign-csr instead.",
    )
    sub.add_argument(
        "--device-id", type=DEVICE_ID, help="device ID = DPS registration ID = certificate CN (default: random)"
    )
    _signer_options(sub)
    sub.add_argument("--curve", choices=sorted(CA_CURVES), type=str.upper, default="P-256", help="device key curve")
    sub.add_argument("--renew", action="store_true", help="replace the device's active certificate")
    sub.add_argument(
        "--out-dir",
        type=Path,
        help="folder for the bundle, made if missing; its parent must exist (default: ./devices/DEVICE_ID)",
    )

    sub = command(
        "sign-csr",
        sign_csr,
        "sign a device CSR (PEM or DER); the same CSR again returns the same certificate",
        "Sign a device's PKCS#10 CSR. The CSR must hold an ECC P-256 or P-384 key and CN = the device ID; its "
        "own extensions are ignored. A device with an active certificate gets a new one only with --renew.",
    )
    sub.add_argument("file", type=Path, help="CSR file, or - for standard input")
    sub.add_argument("--device-id", type=DEVICE_ID, required=True, help="device ID; must equal the CSR's CN")
    _signer_options(sub)
    sub.add_argument("--renew", action="store_true", help="replace the device's active certificate")
    sub.add_argument(
        "--out", type=Path, help="write the chain (device, intermediate) as PEM to this file (its folder must exist)"
    )

    sub = command(
        "sign-batch",
        sign_batch,
        "sign many device CSRs as batches on this host, with a progress bar; resumes where it stopped",
        "Sign many device CSRs on the CA host, by the rules of sign-csr, through the same batch handler the "
        "queue-triggered function runs (each batch is in the ledger and in GET /api/batches). SOURCE is a JSON "
        'Lines file, one {"deviceId": ..., "csr": "<PEM>"} a line; a JSON file of the form POST /api/batches '
        'takes, {"items": [...], "intermediateId": ...} (the intermediate optional; items named by index); or a '
        "folder of CSR files (PEM or DER) named DEVICE_ID.csr or DEVICE_ID.pem. A batch does not renew: an item "
        "for a device with an active certificate for another key fails (renew it alone: sign-csr --renew). "
        "Each item's result (its device bundle, or its error) is appended to the results file as one JSON line "
        "as soon as its chunk is done. Run again after an interruption: devices "
        "already issued there are skipped, and one signed but not yet written gets its certificate back (the "
        "same CSR), never a second one; failed items are tried again. Exit status 4 when any item failed.",
    )
    sub.add_argument(
        "source",
        type=Path,
        metavar="SOURCE",
        help="a JSON Lines file, a JSON file of {items}, or a folder of CSR files",
    )
    sub.add_argument(
        "--results",
        type=Path,
        help="the results file, appended to (default: SOURCE's name, less .jsonl or .json, with .results.jsonl, "
        "beside it; not SOURCE)",
    )
    sub.add_argument(
        "--pem-dir",
        type=Path,
        help="also write each chain (device, intermediate) as DIR/DEVICE_ID.pem (made if missing)",
    )
    _signer_options(sub)

    sub = command(
        "list-certificates",
        list_certificates,
        "list issued certificates: oldest first on SQLite, in its index's key order (a whole fleet by device "
        "ID) on Table Storage",
    )
    sub.add_argument("--device-id", type=DEVICE_ID, help="only this device")
    sub.add_argument("--intermediate", type=CA_ID, help="only certificates signed by this intermediate")
    sub.add_argument(
        "--status",
        type=_rule(parameters.status),
        metavar="STATUS",
        help=f"only this status: {', '.join(CERT_STATUSES)}",
    )
    sub.add_argument(
        "--requested-by",
        type=_rule(parameters.requester),
        metavar="NAME",
        help="only certificates this factory or admin asked for (over the API, or with --factory here), or "
        "cli:USER for what this CLI signed for no factory (the inventory's requestedBy)",
    )
    sub.add_argument(
        "--expiring-within-days",
        type=_rule(parameters.days),
        help=f"only certificates ending within this many days (more than 0, at most {parameters.MAX_DAYS})",
    )
    sub.add_argument(
        "--limit",
        type=_rule(parameters.page_limit),
        default=100,
        help=f"at most this many (1-{parameters.MAX_PAGE}, default 100)",
    )
    sub.add_argument("--cursor", type=_rule(parameters.cursor), help="continue after a previous page (its nextCursor)")

    sub = command(
        "check-expiring",
        check_expiring,
        "list the certificates nearing their end; exit status 3 when there are any",
        "List the device certificates, intermediates and root inside their expiry thresholds (EXPIRY_DEVICE_DAYS, "
        "EXPIRY_INTERMEDIATE_DAYS, EXPIRY_ROOT_DAYS: 30, 90, 365 days by default), and, where Key Vault holds the "
        "CA keys, CA certificates whose expiry in Key Vault differs from the ledger's. Exit status 0 when nothing "
        "is found, 3 when something is (a pipeline's gate), 1 on an error. With --announce it also does what the "
        "timer does: each new stage is recorded and announced once (the expiring-certificates queue, a warning "
        "line) and expired device certificates get the status expired.",
    )
    either = sub.add_mutually_exclusive_group()
    either.add_argument(
        "--within",
        type=_rule(lambda text: parameters.days(text, "within")),
        metavar="DAYS",
        help="one threshold for every kind instead of the settings' (a look: not with --announce)",
    )
    either.add_argument("--announce", action="store_true", help="record and announce new stages, as the timer does")

    sub = command(
        "create-factory",
        create_factory,
        "create a factory bound to intermediates, with an API key (shown once)",
        "Create a factory principal that may sign with the given intermediates and read only its own "
        "certificates, and print its API key once.",
    )
    factory_options(sub, f"factory ID: {CA_ID_RULE}")
    sub.add_argument(
        "--app-id",
        type=_checked(application_id),
        help="its Entra application ID (a GUID), used when PKI_AUTH=easyauth",
    )

    sub = command(
        "bind-factory",
        bind_factory,
        "replace the intermediates a factory may sign with; its API keys stay valid",
        "Replace the intermediates a factory may sign with, for instance when a new intermediate takes over "
        "from one that is disabled. Its API keys, application ID and issued certificates stay as they are.",
    )
    factory_options(sub, "the factory's ID (list-factories shows them)")

    command("list-factories", list_factories, "list factories and the intermediates each may sign with")

    sub = command("create-admin-key", create_admin_key, "create an admin API key (shown once)")
    sub.add_argument(
        "--name", type=PRINCIPAL, default="admin", help="admin principal to add the key to (default: admin)"
    )

    sub = command("create-api-key", create_api_key, "add another API key to an admin or factory (to rotate keys)")
    sub.add_argument("principal", type=PRINCIPAL, help="the admin or factory ID")

    sub = command("revoke-key", revoke_key, "revoke an API key at once")
    sub.add_argument(
        "key_id",
        type=_key_id,
        metavar="KEY_ID",
        help="the key's ID (list-keys shows them), or the whole key (dca_ID_SECRET): its ID is taken from it, "
        "and its secret is never printed",
    )

    command("list-keys", list_keys, "list API keys: IDs and owners, never secrets")

    sub = command(
        "backup",
        backup,
        "write a consistent copy of the CA (ledger, local CA keys, offline DPS records) to a new folder",
        "Write a consistent copy of the CA into DESTINATION, a new or empty folder (mode 0700) whose parent "
        "exists: the ledger as of one moment, as one file (SQLite's online backup: safe while the server "
        "runs), the local CA key files (as they are: encrypted only if PKI_KEY_PASSPHRASE is set) and the "
        "offline DPS records. CA keys in Key Vault stay there. To restore, point PKI_HOME at the folder. Refused "
        "with the ledger in Table Storage (LEDGER_TABLES): back its tables up with AzCopy or Azure Backup.",
    )
    sub.add_argument(
        "destination", type=Path, metavar="DESTINATION", help="a folder that does not exist yet, or is empty"
    )

    sub = command(
        "serve",
        serve,
        "run the HTTP API with uvicorn (local use; in Azure the Functions host runs it)",
        "Run the HTTP API with uvicorn. With --bootstrap, a CA whose ledger is empty (under PKI_HOME, or in "
        "LEDGER_TABLES) first gets a root, an intermediate, an admin key and a factory key, printed once with a "
        "'Try it' block that can be run again and again. What one connection may cost is bounded: its headers' "
        "size, the time its request may take to arrive, and how many connections are open at once. On stop, a "
        "SQLite ledger's WAL is checkpointed into its file.",
    )
    sub.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    sub.add_argument("--port", type=_whole(0, 65535), default=8080, help="port, 0 for any free one (default 8080)")
    sub.add_argument(
        "--workers",
        type=_whole(1, MAX_WORKERS),
        default=1,
        help="worker processes, each with its own socket on the port so that connections spread evenly "
        f"(1-{MAX_WORKERS}, default 1); one that dies is replaced, and the batch chunks it held (embedded "
        "queue) are queued again in this process",
    )
    sub.add_argument("--bootstrap", action="store_true", help="set up a CA with an empty ledger for local use first")
    sub.add_argument(
        "--log-level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug"],
        help="how much the server logs (default info)",
    )
    sub.add_argument(
        "--access-log",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="log a line per request (default on; --no-access-log for load)",
    )
    limits = ConnectionLimits()
    sub.add_argument(
        "--max-connections",
        type=_whole(1, MAX_CONNECTIONS),
        default=limits.max_connections,
        help="connections a worker keeps open at once; past that a new one is answered 503 "
        f"(default {limits.max_connections})",
    )
    sub.add_argument(
        "--max-header-bytes",
        type=_whole(MIN_HEADER_BYTES, MAX_HEADER_BYTES),
        default=limits.max_header_bytes,
        help=f"bytes a request's line and headers may take; past that: 431 (default {limits.max_header_bytes})",
    )
    sub.add_argument(
        "--request-timeout",
        type=_seconds,
        default=limits.request_timeout,
        help="seconds a request's headers and body may take to arrive, from its first byte or the connection's "
        f"start; past that: 408 and the connection closes (default {limits.request_timeout:g})",
    )

    sub = command(
        "revoke",
        revoke,
        "revoke a certificate and its key (every active certificate of that key too)",
        "Revoke a certificate and its key: the key is never certified again, and every active certificate "
        "that holds it is revoked in the same commit. DPS is kept in step for the device: blocked while none "
        "of its certificates is active, else admitting only the active one.",
    )
    sub.add_argument("serial", type=_checked(normalize_serial), help="certificate serial (hex, as openssl prints it)")
    sub.add_argument(
        "--reason",
        type=_checked(revocation_reason),
        default="unspecified",
        help=f"an RFC 5280 reason, kept in the ledger: {', '.join(REVOCATION_REASONS)} (default: unspecified)",
    )
    return parser


def _rule(rule: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that checks a value with one of the rules the HTTP API uses (shared/parameters.py)."""

    def check(text: str) -> Any:
        try:
            return rule(text)
        except parameters.InvalidParameter as error:
            if error.code != parameters.InvalidParameter.code:  # the rule's own code, as the API gives it
                raise _RuleBroken(error.problem, error.code) from None
            raise argparse.ArgumentTypeError(error.problem) from None

    return check


def _checked(check: Callable[[str], Any]) -> Callable[[str], Any]:
    """An argparse type that checks a value with the service's own check for it (shared/pki's names,
    revocation reasons, serials): a value that breaks the rule is a usage error, caught before anything is
    done. The value is what the check returns (a serial in its usual form), or the text when it returns None."""

    def type_(text: str) -> Any:
        try:
            value = check(text)
        except (PkiError, CaError) as error:
            raise _RuleBroken(error.message, error.code) from None
        return text if value is None else value

    return type_


def _common_name(text: str) -> str:
    ca_name(text)  # PkiError "invalid-common-name" when it breaks the rule
    return text


def _organization(text: str) -> str:
    ca_name("CA", text)  # PkiError "invalid-organization" when it breaks the rule (the CN here is any valid one)
    return text


def _key_id(text: str) -> str:
    """revoke-key's KEY_ID: a key's ID, or a whole API key (pasted from where it leaked), whose ID is taken
    out of it by the service's own parser. Anything else is a usage error that does not repeat what was
    given, since it may be a secret, or part of one."""
    whole = split_api_key(text)
    if whole:
        return whole[0]
    if split_api_key(f"{KEY_PREFIX}_{text}_{'A' * 43}"):  # an ID is what the parser takes between the underscores
        return text.strip()
    raise argparse.ArgumentTypeError(
        f"must be a key's ID as list-keys shows it, or a whole API key ({KEY_PREFIX}_ID_SECRET); "
        "what was given is neither (it is not repeated here, in case it holds a secret)"
    )


# the rule of CA IDs, which principal names follow too (shared/pki/names.py check_ca_id)
CA_ID_RULE = parameters.CA_ID_RULE
CA_ID = _checked(check_ca_id)
PRINCIPAL = _checked(check_principal_name)
DEVICE_ID = _checked(check_device_id)


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number of seconds, not {text!r}") from None
    if not 0 < value <= MAX_REQUEST_TIMEOUT:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"must be more than 0 and at most {MAX_REQUEST_TIMEOUT:g} seconds, not {text!r}"
        )
    return value


def _whole(low: int, high: int) -> Callable[[str], int]:
    def check(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be a whole number, not {text!r}") from None
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be {low}-{high}, not {value}")
        return value

    return check


def run() -> NoReturn:
    """`python cli.py`: main, and a last flush of standard output that may find its reader gone."""
    try:
        status = main()
    except SystemExit as done:  # --help
        status = done.code if isinstance(done.code, int) else EXIT_ERROR
    try:
        sys.stdout.flush()
    except BrokenPipeError:
        _drop_stdout()
        status = status or EXIT_ERROR
    sys.exit(status)


if __name__ == "__main__":
    run()
